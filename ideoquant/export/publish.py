"""`ideoquant publish`: create a Hub model repo and upload a converted folder that verifies.

Only the files the model card lists are uploaded, plus the card and the report, so a
stray file in the folder never reaches the Hub unverified. The Hub client is a parameter
(`api`), so tests hand in a fake and nothing touches the network.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import IdeoquantError
from .model_card import CARD_NAME, REPORT_NAME, quant_label, report_files
from .report import format_table, human_bytes
from .verify import load_report, verify_folder


@dataclass
class UploadPlan:
    """What a publish sends: the folder, the target repo, and every file with its size."""

    folder: Path
    repo_id: str
    private: bool
    files: list[tuple[str, int]]
    commit_message: str

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        """A table of the files and the repo they go to."""
        visibility = "private" if self.private else "public unless the owner's default is private"
        rows = [[path, human_bytes(size), str(size)] for path, size in self.files]
        return (
            f"repo {self.repo_id} ({visibility}): {len(self.files)} files, {human_bytes(self.total_bytes)}\n"
            + format_table(["file", "size", "bytes"], rows)
        )


def plan_upload(folder: str | Path, repo_id: str, private: bool = False) -> UploadPlan:
    """Verify the folder (files and structure) and list what would be uploaded; refuses a folder that fails."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdeoquantError(f"{folder}: no such folder")
    if not (folder / CARD_NAME).is_file():
        raise IdeoquantError(f"{folder}: no model card ({CARD_NAME}); publish only folders written by `ideoquant convert`")
    try:
        verify_folder(folder)
    except IdeoquantError as e:
        raise IdeoquantError(f"not publishing {folder}, it does not verify: {e}") from None
    report = load_report(folder)
    files = [(e["path"], int(e["size"])) for e in report_files(report)]
    files += [(name, (folder / name).stat().st_size) for name in (CARD_NAME, REPORT_NAME)]
    base = report["source"].get("base_model") or report["source"]["name"]
    message = f"Upload {quant_label(report['format'])} of {base} (ideoquant {__version__})"
    return UploadPlan(folder, repo_id, private, sorted(files), message)


def publish_folder(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False, api: Any = None) -> UploadPlan:
    """Create `repo_id` (if needed) and upload the verified folder; with `dry_run`, only plan."""
    plan = plan_upload(folder, repo_id, private)
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    # Exact paths, escaped: file names are matched as fnmatch patterns.
    patterns = [glob.escape(path) for path, _ in plan.files]
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        upload_large_folder = getattr(api, "upload_large_folder", None)
        if upload_large_folder is not None:
            # huggingface_hub before 2.0: upload_folder is one commit; this is the resumable multi-commit upload.
            upload_large_folder(repo_id=repo_id, folder_path=str(plan.folder), repo_type="model", allow_patterns=patterns)
        else:
            # huggingface_hub 2.x: upload_folder itself commits large folders in batches and resumes when re-run.
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(plan.folder),
                repo_type="model",
                allow_patterns=patterns,
                commit_message=plan.commit_message,
            )
    except Exception as e:  # HTTP, auth and network errors of the Hub client, as one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IdeoquantError(f"publishing to {repo_id} failed: {first}") from None
    return plan
