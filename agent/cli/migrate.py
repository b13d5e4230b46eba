"""``doorbell-agent migrate``: bring the agent's databases to this version's format (install.sh runs it)."""

from __future__ import annotations

import argparse

from agent.cli.common import add_json_flag, config_from, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "migrate",
        help="upgrade the agent's stored data to this version's format (install.sh does it for you)",
        description="Upgrades each database in paths.data_dir that an older version wrote, in place and all or "
        "nothing; running it again changes nothing. Refuses, changing nothing, if a newer version wrote one "
        "(exit 2): this version would not run or share with it. Run it as the agent's user.",
    )
    add_json_flag(p)
    p.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from agent.state.migrate import migrate_data_dir

    cfg = config_from(args)
    done = migrate_data_dir(cfg.paths.data_dir)
    if args.json:
        print_json({"data_dir": str(cfg.paths.data_dir),
                    "databases": [{"file": u.name, "before": u.before, "after": u.after} for u in done]})
        return 0
    for u in done:
        if u.before is None:
            print(f"{u.name}: not made yet (the agent makes it in the current format when it needs it)")
        elif u.changed:
            print(f"{u.name}: upgraded from format {u.before} to {u.after}")
        else:
            print(f"{u.name}: already in the current format ({u.after})")
    return 0
