"""Named assets (the GPT-2 BPE ranks, tinyshakespeare), found offline first.

    TRITONGPT_ASSETS=../shared/data python -c \
        "from tritongpt.data.assets import find_asset; print(find_asset('gpt2.tiktoken'))"

`find_asset(name)` looks in this order and returns the first hit:
  1. each directory of env var TRITONGPT_ASSETS (os.pathsep-separated),
  2. the user cache `cache_dir()`: $TRITONGPT_CACHE, else $XDG_CACHE_HOME/tritongpt, else
     ~/.cache/tritongpt,
  3. a download into that cache (temp file, sha256 check, rename): gpt2.tiktoken through
     tiktoken's own cached download of GPT-2's ranks (the r50k ranks file, the same bytes),
     tinyshakespeare.txt from char-rnn's repository.
With none of these it raises one TritonGPTError saying which file to put where.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write


@dataclass(frozen=True)
class Asset:
    checksum: str  # "sha256:<hex>", or "git-blob-sha1:<hex>" (the file's object id in its git repository)
    url: str
    what: str

    @property
    def sha256(self) -> str | None:
        kind, _, value = self.checksum.partition(":")
        return value if kind == "sha256" else None


ASSETS = {
    "gpt2.tiktoken": Asset(
        checksum="sha256:306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        url="https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        what="GPT-2's BPE merge ranks in tiktoken's format",
    ),
    "tinyshakespeare.txt": Asset(
        checksum="sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        what="char-rnn's tinyshakespeare input.txt",
    ),
    "hellaswag_val.jsonl": Asset(
        # the object id of data/hellaswag_val.jsonl in github.com/rowanz/hellaswag
        checksum="git-blob-sha1:0f5ee25d72216f12317d5d8a7b92deafa423d81e",
        url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
        what="HellaSwag's validation set (10,042 items), as llm.c evaluates it",
    ),
}


def asset_dirs() -> list[Path]:
    """The directories listed in TRITONGPT_ASSETS, in order."""
    return [Path(d).expanduser() for d in os.environ.get("TRITONGPT_ASSETS", "").split(os.pathsep) if d]


def cache_dir() -> Path:
    """Where downloaded assets are kept: $TRITONGPT_CACHE, $XDG_CACHE_HOME/tritongpt or ~/.cache/tritongpt."""
    if os.environ.get("TRITONGPT_CACHE"):
        return Path(os.environ["TRITONGPT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tritongpt"
    return Path.home() / ".cache" / "tritongpt"


def find_asset(name: str, download: bool = True) -> Path:
    """Path of the named asset: TRITONGPT_ASSETS dirs, then cache_dir(), then a download into the cache."""
    candidates = [d / name for d in asset_dirs()] + [cache_dir() / name]
    for path in candidates:
        if path.is_file():
            return path
    asset = ASSETS.get(name)
    failure = "it is not a known downloadable asset" if asset is None else "downloading is disabled"
    if asset is not None and download:
        try:
            return _download(name, asset)
        except (OSError, ValueError, ImportError) as exc:
            failure = f"downloading it failed ({type(exc).__name__}: {exc})"
    where = ", ".join(str(p.parent) for p in candidates)
    check = f" ({asset.checksum}, {asset.what}, from {asset.url})" if asset else ""
    raise TritonGPTError(f"asset {name!r} not found and {failure}: put {name}{check} in a directory listed in "
                         f"TRITONGPT_ASSETS or in the cache {cache_dir()} (looked in: {where})")


def _download(name: str, asset: Asset) -> Path:
    """Fetch `asset` into cache_dir()/name via a temp file, verify its checksum, then rename."""
    target = cache_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if name == "gpt2.tiktoken":
        import tiktoken.load  # tiktoken's own download, cached in its TIKTOKEN_CACHE_DIR
        data = tiktoken.load.read_file_cached(asset.url, asset.sha256)
    else:
        with urllib.request.urlopen(asset.url, timeout=60) as response:
            data = response.read()  # assets are a few MB
    got = checksum(asset.checksum.partition(":")[0], data)
    if got != asset.checksum:  # raised before anything is written
        raise ValueError(f"checksum of the download is {got}, expected {asset.checksum}")
    atomic_write(target, lambda out: out.write(data))
    return target


def checksum(kind: str, data: bytes) -> str:
    """"sha256:<hex>" or "git-blob-sha1:<hex>" (git's object id: the sha1 of "blob <size>", a NUL byte
    and the data)."""
    if kind == "sha256":
        return f"sha256:{hashlib.sha256(data).hexdigest()}"
    if kind == "git-blob-sha1":
        header = b"blob " + str(len(data)).encode() + bytes(1)  # "blob <size>" and a NUL byte
        return f"git-blob-sha1:{hashlib.sha1(header + data).hexdigest()}"
    raise ValueError(f"unknown checksum kind {kind!r}")
