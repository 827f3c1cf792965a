"""Unlabelled English text for distilling a sentence encoder: sentences from the docstrings of
the Python packages pinned in scripts/requirements.txt (numpy, onnx, ...), so the same pins give
the same text on every machine. With --wide, also the pinned openai client (its documented
fields included) and the Python standard library (the same for one Python version). With
--rust, also the prose of the crates this workspace's Cargo.lock pins (their markdown files and
doc comments, read from cargo's registry cache: run `cargo fetch --locked` first so that every
pinned crate is there). With --books, also the books of the Rust toolchain in use (rustup's
rust-docs component). With --html DIR (repeatable), also the paragraphs of every HTML page
under DIR (the Python documentation of Debian's python3.11-doc, say). With --crates DIR
(repeatable), also the prose of the crates `encoder_crates.py fetch` unpacked into DIR (those
its DIR/crates.txt lists). With --exclude FILE (repeatable), sentences already in FILE are
left out (text for a later stage of training); with --shuffle SEED, the N sentences kept are a random
sample instead of an even spread. Sentences are of
letters and spaces only, 40 to 300 characters; with --loose, numbers, symbols and inline code
stay as written (20 to 600 characters). The repository's own docs, which the encoder
benchmark scores on, are not used.

usage: encoder_text.py OUT.txt [--sentences 3000] [--wide] [--rust] [--books] [--html DIR] [--crates DIR]
                         [--loose] [--exclude FILE] [--shuffle SEED]   (--sentences 0: every sentence found)
"""
import argparse
import ast
import glob
import html.parser
import os
import random
import re
import subprocess
import sys
import tomllib

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--sentences", type=int, default=3000)
ap.add_argument("--wide", action="store_true")
ap.add_argument("--rust", action="store_true")
ap.add_argument("--loose", action="store_true")
ap.add_argument("--books", action="store_true")
ap.add_argument("--html", action="append", default=[], metavar="DIR")
ap.add_argument("--crates", action="append", default=[], metavar="DIR")
ap.add_argument("--exclude", action="append", default=[], metavar="FILE")
ap.add_argument("--shuffle", type=int, metavar="SEED")
a = ap.parse_args()

site = sorted(glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages")))
if not site:
    sys.exit(f"no site-packages under {sys.prefix}")
files = []
packages = ["numpy", "onnx", "onnxruntime", "yaml", "onnx_ir"] + (["openai"] if a.wide else [])
for pkg in packages:
    files += sorted(glob.glob(os.path.join(site[0], pkg, "**", "*.py"), recursive=True))
if a.wide:
    stdlib = sorted(glob.glob(os.path.join(sys.base_prefix, "lib", "python3*")))[0]
    files += [
        f
        for f in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True))
        if "site-packages" not in f and "/test" not in f
    ]


def docstrings(node):
    """The node's docstring, and for a class the strings written under its attributes (how
    generated API clients document their fields)."""
    doc = ast.get_docstring(node)
    if doc:
        yield doc
    if isinstance(node, ast.ClassDef):
        for a, b in zip(node.body, node.body[1:]):
            if (
                isinstance(a, (ast.AnnAssign, ast.Assign))
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                yield b.value.value


seen, out = set(), []
excluded = set(l.strip() for path in a.exclude for l in open(path, encoding="utf-8"))


def keep(s):
    """Adds `s` when it reads as a sentence of prose, once. Strict: letters and spaces only,
    40 to 300 characters. Loose: also numbers, symbols and code words as written, 20 to 600
    characters, at least four words and mostly letters."""
    s = s.strip()
    if not s or s in seen or s in excluded:
        return
    letters = sum(ch.isalpha() or ch == " " for ch in s)
    if a.loose:
        ok = 20 <= len(s) <= 600 and letters / len(s) > 0.6 and len(s.split()) >= 4 and (s[0].isupper() or s[0].isdigit())
    else:
        ok = 40 <= len(s) <= 300 and letters / len(s) > 0.9 and s[0].isupper()
    if ok:
        seen.add(s)
        out.append(s)


def sentences(doc):
    """Adds the prose sentences of `doc`: the paragraphs before numpydoc's section headers,
    without code and markup."""
    prose = re.split(r"\n\s*(Parameters|Returns|Examples|See Also|Notes|Raises|Yields|Attributes|References)\s*\n\s*-{3,}", doc)[0]
    if a.loose:
        # Inline code keeps its words (a sentence without them has a hole).
        prose = re.sub(r"(?::[a-z]+)+:`([^`]*)`", r"\1", prose)
        prose = re.sub(r"``([^`]*)``|`([^`]*)`", lambda m: m.group(1) or m.group(2) or "", prose)
    prose = re.sub(r"``[^`]*``|`[^`]*`|(?::[a-z]+)+:|>>>.*|\.\.\s+\w+::.*", " ", prose)
    prose = re.sub(r"\s+", " ", prose)
    for s in re.split(r"(?<=[.!?])\s+", prose):
        keep(s)


def markdown_sentences(text):
    """Adds the prose sentences of markdown `text`: paragraphs without code blocks, headings,
    tables, lists and quotes; links keep their words; a sentence with inline code is dropped
    (taking the code out leaves a sentence with a hole), or with --loose kept with the code's
    text in place."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`([^`\n]*)`", r"\1" if a.loose else "\0", text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"\[([^\]]*)\](\[[^\]]*\])?", r"\1", text)
    text = re.sub(r"<[^<>\n]+>", " ", text)
    # Emphasis marks: **bold**, __bold__ and *italic* keep their words.
    text = re.sub(r"\*\*|__", "", text)
    text = re.sub(r"(?<![\w*])\*(?=\S)([^*\n]*?\S)\*(?![\w*])", r"\1", text)
    for para in re.split(r"\n\s*\n", text):
        lines = [l.strip() for l in para.split("\n") if not re.match(r"\s*(#|\||[-*+] |\d+\. |>|    )", l)]
        for s in re.split(r"(?<=[.!?])\s+", " ".join(lines)):
            if "\0" not in s and s.strip()[-1:] in (".", "!", "?"):
                keep(s)


def rust_crates():
    """Folders of the crates.io packages Cargo.lock pins, in cargo's registry cache."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with open(os.path.join(root, "Cargo.lock"), "rb") as f:
        lock = tomllib.load(f)
    home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    caches = sorted(glob.glob(os.path.join(home, "registry", "src", "*")))
    pinned = sorted((p["name"], p["version"]) for p in lock["package"] if p.get("source", "").startswith("registry"))
    found, missing = [], []
    for name, version in pinned:
        # .cargo-ok marks a crate cargo finished unpacking.
        dirs = [d for d in (os.path.join(c, f"{name}-{version}") for c in caches) if os.path.isfile(os.path.join(d, ".cargo-ok"))]
        (found if dirs else missing).append(dirs[0] if dirs else f"{name}-{version}")
    if missing:
        sys.exit(f"{len(missing)} pinned crates are not in cargo's registry cache ({missing[0]}, ...): run cargo fetch --locked")
    return found


def rust_prose(crate):
    """Adds the sentences of a crate's markdown files (not change logs or licences) and of its
    doc comments."""
    for path in sorted(glob.glob(os.path.join(crate, "**", "*.md"), recursive=True)):
        if not re.search(r"CHANGE|LICEN[CS]E|COPYRIGHT", os.path.basename(path).upper()):
            markdown_sentences(open(path, encoding="utf-8", errors="replace").read())
    for path in sorted(glob.glob(os.path.join(crate, "**", "*.rs"), recursive=True)):
        block = []
        for line in open(path, encoding="utf-8", errors="replace").read().split("\n") + [""]:
            m = re.match(r"\s*//[/!]\s?(.*)", line)
            if m:
                block.append(m.group(1))
            elif block:
                markdown_sentences("\n".join(block))
                block = []


class Paragraphs(html.parser.HTMLParser):
    """The text of an HTML page's paragraphs and list items, without code blocks, headings,
    tables and navigation."""

    def __init__(self):
        super().__init__()
        self.depth, self.skip, self.buf, self.paras = 0, 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style", "nav", "table", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.skip += 1
        elif tag in ("p", "li") and not self.skip:
            self.flush()
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style", "nav", "table", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.skip = max(0, self.skip - 1)
        elif tag in ("p", "li") and self.depth and not self.skip:
            # Only the paragraphs opened outside skipped parts were counted.
            self.flush()
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buf.append(data)

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        if text:
            self.paras.append(text)
        self.buf = []


def rust_books():
    """The books of the Rust toolchain in use (rustup's rust-docs component): each book's
    one-page print.html."""
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    html_dir = os.path.join(sysroot, "share", "doc", "rust", "html")
    books = sorted(glob.glob(os.path.join(html_dir, "*", "print.html")))
    if not books:
        sys.exit(f"no books under {html_dir}: rustup component add rust-docs")
    return books


for path in files:
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for doc in docstrings(node) if a.wide else filter(None, [ast.get_docstring(node)]):
            sentences(doc)

if a.rust:
    for crate in rust_crates():
        rust_prose(crate)

def html_sentences(path):
    """Adds the sentences of the paragraphs and list items of the HTML page at `path`."""
    p = Paragraphs()
    p.feed(open(path, encoding="utf-8", errors="replace").read())
    for para in p.paras:
        for s in re.split(r"(?<=[.!?])\s+", para):
            if s.strip()[-1:] in (".", "!", "?"):
                keep(s)


if a.books:
    for book in rust_books():
        html_sentences(book)

for folder in a.html:
    pages = sorted(glob.glob(os.path.join(folder, "**", "*.html"), recursive=True))
    if not pages:
        sys.exit(f"no HTML pages under {folder}")
    for page in pages:
        html_sentences(page)

for folder in a.crates:
    # encoder_crates.py writes crates.txt once every crate of its list is unpacked.
    listed = os.path.join(folder, "crates.txt")
    if not os.path.isfile(listed):
        sys.exit(f"{listed} is missing: run scripts/encoder_crates.py fetch LIST {folder} first")
    for crate in sorted(l.strip() for l in open(listed) if l.strip()):
        rust_prose(os.path.join(folder, crate))

if len(out) < a.sentences:
    print(f"encoder_text: only {len(out)} sentences found", file=sys.stderr)
# A spread over all packages rather than the first files only (0: every sentence found), or
# a random sample.
n = a.sentences if a.sentences > 0 else len(out)
if a.shuffle is not None:
    random.Random(a.shuffle).shuffle(out)
    picked = out[:n]
else:
    step = max(1, len(out) // max(n, 1))
    picked = out[::step][:n]
with open(a.out, "w", encoding="utf-8") as f:
    f.write("\n".join(picked) + "\n")
print(f"encoder_text: {len(picked)} sentences -> {a.out}")
