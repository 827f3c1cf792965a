"""More Rust prose for the encoder student's text: crates from crates.io named in a pinned list
(`models/minilm/text-crates.txt`, one `name version sha256` per line), so everyone with the same
list trains on the same text.

    encoder_crates.py fetch LIST DIR    downloads each listed crate from static.crates.io, checks
                                        its sha256 and unpacks its .md and .rs files (those under
                                        1 MB: bigger ones are generated bindings) into
                                        DIR/NAME-VERSION (crates already there are skipped), and
                                        writes DIR/crates.txt, the folders of this list
    encoder_crates.py list N > LIST     writes a new list of N crates: the latest release of a set
                                        of well-known seed crates, then of their dependencies,
                                        breadth first, read from the sparse index (index.crates.io)

`encoder_text.py --crates DIR` reads the crates DIR/crates.txt names. The list is a snapshot: `list` gives
other versions on another day, which is why the list is kept in the repository.
"""
import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request

# Crates users of Rust know by name, across the ecosystem: the list grows from these.
SEEDS = """
tokio axum hyper reqwest actix-web warp rocket tide surf diesel sqlx sea-orm rusqlite postgres redis mongodb
bevy wgpu winit egui eframe iced druid glium ggez macroquad nannou image imageproc png gif jpeg-decoder resvg tiny-skia
serde serde_json serde_yaml toml ron bincode postcard rmp-serde ciborium prost tonic protobuf capnp flatbuffers
clap structopt argh pico-args indicatif console dialoguer crossterm ratatui tui termion colored owo-colors
anyhow thiserror eyre color-eyre miette snafu log env_logger tracing tracing-subscriber slog fern
rayon crossbeam parking_lot dashmap once_cell lazy_static arc-swap flume async-channel futures async-std smol
regex nom pest lalrpop logos chumsky combine winnow syn quote proc-macro2 darling
rand rand_chacha getrandom uuid chrono time humantime jiff
ring rustls openssl sha2 blake3 aes-gcm ed25519-dalek x25519-dalek curve25519-dalek argon2 bcrypt
embedded-hal embedded-io heapless nb cortex-m cortex-m-rt rtic embassy-executor embassy-time defmt probe-rs
stm32f4xx-hal nrf52840-hal esp-hal riscv
nalgebra ndarray num-traits num-bigint glam cgmath euclid approx statrs polars arrow datafusion
candle-core burn tch ort tract-onnx linfa smartcore tokenizers safetensors
walkdir ignore globset notify tempfile fs_extra memmap2 zip tar flate2 zstd lz4_flex brotli xz2
bytes byteorder smallvec arrayvec tinyvec bitflags itertools either indexmap hashbrown ahash
wasm-bindgen js-sys web-sys yew leptos dioxus tauri gloo
mio socket2 quinn h2 http tower tower-http lettre trust-dns-resolver hickory-resolver url percent-encoding
git2 gix cargo semver toml_edit cargo_metadata
criterion proptest quickcheck insta mockall rstest
pyo3 napi cxx bindgen cc cmake pkg-config libloading
sysinfo nix libc windows winapi
ropey tree-sitter syntect pulldown-cmark comrak handlebars tera askama minijinja
plotters petgraph rstar kdtree geo
serialport rppal linux-embedded-hal i2cdev spidev gpio-cdev
""".split()

MARK = ".edgelm-unpacked"
# Files bigger than this are generated code (bindings, tables), not prose.
LARGEST = 1 << 20


def get(url):
    """The body at `url`; None when it does not exist. Retries other failures three times, then
    raises OSError."""
    for attempt in range(3):
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            err = e
        except (OSError, http.client.HTTPException) as e:
            err = e
        time.sleep(1 + attempt)
    raise OSError(f"{url}: {err}")


def index_path(name):
    """Where the sparse index keeps `name`'s file."""
    n = name.lower()
    return {1: f"1/{n}", 2: f"2/{n}", 3: f"3/{n[0]}/{n}"}.get(len(n), f"{n[:2]}/{n[2:4]}/{n}")


def latest(name):
    """The index entry of `name`'s highest release that is neither yanked nor a pre-release (the
    index lists releases in the order they were published, which puts a fix to an old branch
    after newer versions)."""
    body = get(f"https://index.crates.io/{index_path(name)}")
    releases = [json.loads(line) for line in (body or b"").decode().splitlines()]
    releases = [e for e in releases if not e["yanked"] and "-" not in e["vers"] and "+" not in e["vers"]]
    return max(releases, key=lambda e: tuple(int(x) for x in e["vers"].split(".")), default=None)


def make_list(n):
    seen, rows, frontier = set(), [], list(dict.fromkeys(SEEDS))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        while frontier and len(rows) < n:
            names = [x for x in frontier if x not in seen]
            seen.update(names)
            frontier = []
            for entry in pool.map(latest, names):
                if entry is None:
                    continue
                rows.append((entry["name"], entry["vers"], entry["cksum"]))
                for dep in entry["deps"]:
                    if dep.get("kind") in (None, "normal", "build"):
                        frontier.append(dep.get("package") or dep["name"])
            frontier = [x for x in dict.fromkeys(frontier) if x not in seen]
            print(f"encoder_crates: {len(rows)} crates listed", file=sys.stderr)
    for name, version, sha in rows[:n]:
        print(name, version, sha)


def unpack(row, out):
    """Downloads one crate, checks it and unpacks its .md and .rs files; the mark file, written
    last, says the folder is complete. Returns what went wrong, or None."""
    name, version, sha = row
    folder = os.path.join(out, f"{name}-{version}")
    if os.path.isfile(os.path.join(folder, MARK)):
        return None
    try:
        data = get(f"https://static.crates.io/crates/{name}/{name}-{version}.crate")
    except OSError as e:
        return str(e)
    if data is None:
        return f"{name} {version} is not on crates.io"
    if hashlib.sha256(data).hexdigest() != sha:
        return f"{name} {version}: sha256 differs from the list's"
    root = os.path.realpath(out)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.endswith((".md", ".rs")) and member.size <= LARGEST):
                continue
            path = os.path.realpath(os.path.join(out, member.name))
            # A crate's files live under NAME-VERSION/; anything else is skipped.
            if not path.startswith(os.path.realpath(folder) + os.sep) or not path.startswith(root + os.sep):
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                shutil.copyfileobj(tar.extractfile(member), f)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, MARK), "w").close()
    return None


def fetch(list_path, out):
    rows = []
    for number, line in enumerate(open(list_path), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 3:
            raise SystemExit(f"{list_path}:{number}: expected `name version sha256`")
        rows.append(tuple(fields))
    os.makedirs(out, exist_ok=True)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for done, problem in enumerate(pool.map(lambda row: unpack(row, out), rows), 1):
            if problem:
                failed.append(problem)
            if done % 250 == 0:
                print(f"encoder_crates: {done} of {len(rows)} crates", file=sys.stderr)
    if failed:
        raise SystemExit(f"{len(failed)} crates failed:\n" + "\n".join(failed))
    # The folders of this list: a folder left from another list is not read.
    with open(os.path.join(out, "crates.txt"), "w") as f:
        f.write("".join(f"{name}-{version}\n" for name, version, _ in rows))
    print(f"encoder_crates: {len(rows)} crates in {out}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "fetch":
        fetch(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "list":
        try:
            make_list(int(sys.argv[2]))
        except OSError as e:
            raise SystemExit(str(e))
    else:
        raise SystemExit(__doc__)
