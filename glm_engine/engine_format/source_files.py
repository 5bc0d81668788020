"""Files a build reads from a checkpoint or tokenizer directory: a file name taken
from the directory (an index's weight_map, the tokenizer file list) is used only
when it is a regular file that resolves inside that directory, so that a link or a
`../` name cannot pull another file (a secret, say) into an engine."""

from __future__ import annotations

from pathlib import Path

from glm_engine import GlmEngineError


def source_root(directory: Path) -> Path:
    """Where the files of `directory` may resolve: the directory itself, or, for a
    snapshot in the Hugging Face hub cache (<repo>/snapshots/<revision>, whose files
    are links into <repo>/blobs), the repository's cache directory."""
    directory = directory.resolve()
    if directory.parent.name == "snapshots" and (directory.parent.parent / "blobs").is_dir():
        return directory.parent.parent
    return directory


def file_inside(directory: Path, name: str, what: str) -> Path | None:
    """`directory / name` when it is a regular file inside the directory's source_root,
    None when there is no such file; GlmEngineError when the name or a link leads
    outside, or to something that is not a regular file."""
    path = directory / name
    resolved = path.resolve()
    if not resolved.is_relative_to(source_root(directory)):
        raise GlmEngineError(f"{what} {name!r} in {directory} resolves outside it (to {resolved}); "
                             "refusing to read it: replace the link with the file itself")
    if not path.exists() and not path.is_symlink():
        return None
    if not resolved.is_file():
        raise GlmEngineError(f"{what} {path} is not a regular file")
    return path
