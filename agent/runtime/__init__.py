"""The long-running process: starts the recorder and the sharing service, stops them together."""
