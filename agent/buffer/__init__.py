"""The rolling video buffer: capture sources, the recorder, segment files, their index, clips, masks."""
