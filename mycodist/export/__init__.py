"""The export stage (train → export → serve): one folder holding everything serving needs.

    from mycodist.export import export_run, read_export
    export_run(run_dir)                 # RUN_DIR/export, from the newest complete checkpoint
    folder = read_export(export_dir)    # checked layout and version; clear errors for old or partial exports
"""

from mycodist.export.artifact import VERSION, ExportFolder, read_export
from mycodist.export.build import export_run

__all__ = ["VERSION", "ExportFolder", "export_run", "read_export"]
