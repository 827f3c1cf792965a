//! Board profiles (`boards/*.toml`): what a device is and how edgelm should run on it, and
//! the one place where a profile turns into engine settings for every subcommand.
//!
//! A profile fixes the settings that depend on the hardware rather than on the model: the
//! Rust target and ONNX Runtime build to deploy, the execution providers to try in order, the
//! number of intra-op threads, and the memory budget a bundle must fit in.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use edgelm_runtime::bundle::Precision;
use edgelm_runtime::decoder::KvCacheMode;
use edgelm_runtime::signature::TrustedKeys;
use edgelm_runtime::{EngineOptions, ExecutionProvider};

/// One board. Every key is parsed and used; unknown ones are refused with their name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    /// The profile's file name without `.toml` (`raspberry-pi-5`): how commands name the board.
    #[serde(skip)]
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Rust target triple of the edgelm binary for this board (`just build-board`).
    pub target: String,
    /// The ONNX Runtime library the board runs.
    pub ort: OrtSource,
    /// Execution providers in order of preference; `cpu` in the list allows falling back.
    pub execution_providers: Vec<ExecutionProvider>,
    /// Intra-op threads (usually the number of big cores).
    pub threads: usize,
    /// Memory a bundle may use at run time (weights plus KV cache plus arena), in MiB.
    pub memory_budget_mib: u64,
    /// Precision of the bundles made for this board (`edgelm doctor` warns on another).
    pub precision: Precision,
    /// The board's own serial port, the default of `edgelm serve --board` without `--serial`.
    #[serde(default)]
    pub serial: Option<SerialPort>,
    /// Where the deploy tree goes on the board (`bin/`, `lib/`, `share/edgelm/`).
    pub install_prefix: PathBuf,
    /// Notes for whoever flashes the board (`edgelm board`).
    #[serde(default)]
    pub notes: String,
    /// Which bundle signatures the board trusts, and whether it requires one.
    #[serde(default)]
    pub signatures: Signatures,
    /// The folder the profile was read from (relative key paths start there).
    #[serde(skip)]
    pub dir: PathBuf,
    /// The profile file itself.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[signatures]`: the public keys bundles may be signed with (`edgelm-distill keygen` makes
/// them) and whether unsigned bundles are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signatures {
    /// Refuse bundles that are unsigned (signed by another key or altered ones are refused
    /// whenever keys are listed).
    #[serde(default)]
    pub require: bool,
    /// PEM public key files, or folders of `*.pub` files; relative to the profile's folder.
    #[serde(default)]
    pub keys: Vec<PathBuf>,
}

/// Where the board's ONNX Runtime library comes from (`[ort]`, `source = ...`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum OrtSource {
    /// `libonnxruntime.so` out of the onnxruntime wheel on PyPI, at the version pinned in
    /// ort-version.txt, for a platform tag such as `manylinux_2_27_aarch64`.
    PypiWheel {
        /// Wheel platform tag.
        platform: String,
        /// ONNX Runtime C API level the library offers.
        api: u32,
    },
    /// A library the board's SDK installs (on Jetson the onnxruntime-gpu wheel built for JetPack, with CUDA and TensorRT).
    System {
        /// Path of `libonnxruntime.so` on the board.
        path: PathBuf,
        /// Its ONNX Runtime release, e.g. `1.20.0`.
        version: String,
        /// ONNX Runtime C API level the library offers.
        api: u32,
    },
}

impl OrtSource {
    /// The C API level the board's library offers.
    pub fn api(&self) -> u32 {
        match self {
            OrtSource::PypiWheel { api, .. } | OrtSource::System { api, .. } => *api,
        }
    }
}

/// A serial port (`[serial]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// Device path, e.g. `/dev/ttyAMA0`.
    pub device: String,
    /// Line speed in bits per second.
    #[serde(default = "default_baud")]
    pub baud: u32,
}

fn default_baud() -> u32 {
    115_200
}

/// A precision as bundles and profiles spell it (`int8`).
pub fn precision_name(p: Precision) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_else(|| format!("{p:?}"))
}

/// The CPU architecture a target triple or wheel platform tag names.
pub fn arch_of(name: &str) -> &str {
    ["x86_64", "aarch64", "armv7", "riscv64"].into_iter().find(|a| name.contains(a)).unwrap_or("unknown")
}

impl BoardProfile {
    /// Reads and checks a profile.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading board profile {}", path.display()))?;
        let mut p: BoardProfile = toml::from_str(&text)
            .with_context(|| format!("board profile {}: not a valid board profile", path.display()))?;
        p.id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        p.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        p.path = path.to_path_buf();
        p.check().with_context(|| format!("board profile {}", path.display()))?;
        Ok(p)
    }

    /// What the file format cannot say: values in range and keys that agree.
    fn check(&self) -> Result<()> {
        if self.threads == 0 || self.memory_budget_mib == 0 {
            bail!("`threads` and `memory_budget_mib` must be positive");
        }
        if self.execution_providers.is_empty() {
            bail!("`execution_providers` is empty; list at least `{{ kind = \"cpu\" }}`");
        }
        if self.target.split('-').count() < 3 || arch_of(&self.target) == "unknown" {
            bail!("`target` `{}` is not a Rust target triple such as aarch64-unknown-linux-gnu", self.target);
        }
        let api = self.ort.api();
        let newest = edgelm_runtime::ortlib::pinned_api();
        if !(17..=newest).contains(&api) {
            bail!("`ort.api` {api} is outside the levels edgelm knows (17 to {newest})");
        }
        match &self.ort {
            OrtSource::PypiWheel { platform, .. } => {
                if arch_of(platform) != arch_of(&self.target) {
                    bail!("`ort.platform` `{platform}` is not for the architecture of `target` `{}`", self.target);
                }
                // The wheel is the pinned release: a lower level would build a binary that
                // cannot use what the library it ships with offers, for no reason.
                if api != newest {
                    bail!(
                        "`ort.api` {api} does not match the wheel's ONNX Runtime {} (level {newest}); set `api = {newest}`",
                        edgelm_runtime::ortlib::ORT_VERSION
                    );
                }
            }
            OrtSource::System { version, .. } => {
                // ONNX Runtime 1.N offers C API levels up to N; a build asking for more fails to load.
                let minor = version.split('.').collect::<Vec<_>>();
                let offered = match minor.as_slice() {
                    ["1", m, ..] => m.parse::<u32>().ok(),
                    _ => None,
                };
                let Some(offered) = offered else {
                    bail!("`ort.version` `{version}` is not an ONNX Runtime version such as 1.20.0");
                };
                if api > offered {
                    bail!("`ort.api` {api} is above what `ort.version` {version} offers ({offered}); set `api` to {offered} or lower");
                }
            }
        }
        if self.signatures.require && self.signatures.keys.is_empty() {
            bail!("`signatures.require` is set but `signatures.keys` names no public key");
        }
        // Relative keys travel with the profile (deploy copies them beside it), so they must
        // stay below its folder.
        if let Some(k) = self
            .signatures
            .keys
            .iter()
            .find(|k| k.is_relative() && k.components().any(|c| matches!(c, std::path::Component::ParentDir)))
        {
            bail!(
                "`signatures.keys` entry `{}` leaves the profile's folder; use a path below it or an absolute one",
                k.display()
            );
        }
        if self.install_prefix.is_relative() {
            bail!("`install_prefix` `{}` must be an absolute path on the board", self.install_prefix.display());
        }
        Ok(())
    }

    /// The profile as `key = value` lines (`edgelm board`), every key in it.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("id".into(), self.id.clone()),
            ("name".into(), self.name.clone()),
            ("target".into(), self.target.clone()),
            ("arch".into(), arch_of(&self.target).to_owned()),
        ];
        match &self.ort {
            OrtSource::PypiWheel { platform, api } => {
                out.push(("ort.source".into(), "pypi-wheel".into()));
                out.push(("ort.version".into(), edgelm_runtime::ortlib::ORT_VERSION.into()));
                out.push(("ort.platform".into(), platform.clone()));
                out.push(("ort.api".into(), api.to_string()));
            }
            OrtSource::System { path, version, api } => {
                out.push(("ort.source".into(), "system".into()));
                out.push(("ort.version".into(), version.clone()));
                out.push(("ort.path".into(), path.display().to_string()));
                out.push(("ort.api".into(), api.to_string()));
            }
        }
        let eps: Vec<&str> = self.execution_providers.iter().map(ExecutionProvider::name).collect();
        out.push(("execution_providers".into(), eps.join(",")));
        // Each provider's options, under its position in the list.
        for (i, ep) in self.execution_providers.iter().enumerate() {
            let options = match ep {
                ExecutionProvider::Cpu {} | ExecutionProvider::Xnnpack {} => String::new(),
                ExecutionProvider::Cuda { device_id } => format!(" device_id={device_id}"),
                ExecutionProvider::Tensorrt { device_id, fp16, engine_cache } => format!(
                    " device_id={device_id} fp16={fp16} engine_cache={}",
                    engine_cache.as_ref().map_or("none".into(), |p| p.display().to_string())
                ),
            };
            out.push((format!("execution_providers.{i}"), format!("{}{options}", ep.name())));
        }
        out.push(("threads".into(), self.threads.to_string()));
        out.push(("memory_budget_mib".into(), self.memory_budget_mib.to_string()));
        out.push(("precision".into(), precision_name(self.precision)));
        if let Some(s) = &self.serial {
            out.push(("serial.device".into(), s.device.clone()));
            out.push(("serial.baud".into(), s.baud.to_string()));
        }
        out.push(("signatures.require".into(), self.signatures.require.to_string()));
        let keys: Vec<String> = self.signatures.keys.iter().map(|k| k.display().to_string()).collect();
        out.push(("signatures.keys".into(), keys.join(",")));
        out.push(("install_prefix".into(), self.install_prefix.display().to_string()));
        out.push(("notes".into(), self.notes.clone()));
        out
    }

    /// The signature policy: the listed keys, read now (relative paths from the profile's
    /// folder).
    pub fn trusted_keys(&self) -> Result<TrustedKeys> {
        let paths = self.signatures.keys.iter().map(|k| self.dir.join(k));
        let keys = TrustedKeys::none()
            .with_key_files(paths)
            .with_context(|| format!("board `{}`: the public keys in [signatures]", self.id))?;
        Ok(keys.require(self.signatures.require))
    }

    /// Checks that a bundle's weights plus a KV cache of `kv_bytes` fit the memory budget.
    pub fn check_fits(&self, weight_bytes: u64, kv_bytes: u64) -> Result<()> {
        let need_bytes = weight_bytes + kv_bytes;
        if need_bytes > self.memory_budget_mib << 20 {
            let need = need_bytes.div_ceil(1 << 20);
            bail!(
                "the bundle needs about {need} MiB (weights + KV cache) but board `{}` has a budget of {} MiB; use a smaller or quantized bundle, or fewer new tokens",
                self.name,
                self.memory_budget_mib
            );
        }
        Ok(())
    }
}

/// How a subcommand opens bundles: the board profile, the ONNX Runtime library and the
/// per-command thread and KV cache choices, resolved in one place for run, chat, bench, embed
/// and serve alike.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The board profile given with `--board`.
    pub board: Option<BoardProfile>,
    /// `--ort-lib`.
    pub ort_lib: Option<PathBuf>,
}

impl Placement {
    /// Engine options for `threads` (0: the board's count, else one per core) and `kv_cache`,
    /// with the board's execution providers and, for a board whose ONNX Runtime is the
    /// system's, its library (unless `--ort-lib` names one).
    pub fn engine_options(&self, threads: usize, kv_cache: KvCacheMode) -> Result<EngineOptions> {
        let threads = match (threads, &self.board) {
            (0, Some(b)) => b.threads,
            (t, _) => t,
        };
        let mut opts = EngineOptions::default().with_threads(threads).with_kv_cache(kv_cache);
        if let Some(b) = &self.board {
            opts = opts.with_execution_providers(b.execution_providers.clone()).with_trusted_keys(b.trusted_keys()?);
        }
        let system_lib = self.board.as_ref().and_then(|b| match &b.ort {
            OrtSource::System { path, .. } => Some(path.clone()),
            OrtSource::PypiWheel { .. } => None,
        });
        Ok(match self.ort_lib.clone().or(system_lib) {
            Some(p) => opts.with_ort_library(p),
            None => opts,
        })
    }

    /// Refuses a request whose weights plus KV cache exceed the board's memory budget.
    pub fn check_budget(&self, engine: &edgelm_runtime::Engine, positions: usize) -> Result<()> {
        if let Some(b) = &self.board {
            b.check_fits(engine.weight_bytes(), engine.kv_cache_bytes(positions.min(engine.context_length())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name = 'x'\ntarget = 'aarch64-unknown-linux-gnu'\nthreads = 2\nmemory_budget_mib = 100\n\
        precision = 'int8'\ninstall_prefix = '/opt/edgelm'\n\
        [ort]\nsource = 'pypi-wheel'\nplatform = 'manylinux_2_27_aarch64'\napi = 31\n\
        [[execution_providers]]\nkind = 'cpu'\n";

    fn load_text(text: &str) -> Result<BoardProfile> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        std::fs::write(&p, text).unwrap();
        BoardProfile::load(&p)
    }

    fn refused(text: &str, needle: &str) {
        let e = format!("{:#}", load_text(text).expect_err(needle));
        assert!(e.contains(needle), "expected `{needle}` in: {e}");
    }

    #[test]
    fn shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../boards");
        let mut names = vec![];
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                BoardProfile::load(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
                names.push(p.file_stem().unwrap().to_string_lossy().into_owned());
            }
        }
        names.sort();
        let want = [
            "generic-aarch64-linux",
            "jetson-agx-orin",
            "jetson-orin-nano",
            "raspberry-pi-4",
            "raspberry-pi-5",
            "x86_64-linux",
        ];
        for w in want {
            assert!(names.iter().any(|n| n == w), "boards/{w}.toml missing: {names:?}");
        }
    }

    #[test]
    fn bad_profiles_are_refused_with_the_key_named() {
        assert!(load_text(GOOD).is_ok());
        refused(&format!("turbo = true\n{GOOD}"), "turbo");
        refused(&GOOD.replace("api = 31", "api = 31\nversion = '1.2'"), "version");
        refused(&GOOD.replace("kind = 'cpu'", "kind = 'cpu'\ndevice_id = 1"), "device_id");
        refused(&GOOD.replace("kind = 'cpu'", "kind = 'npu'"), "npu");
        refused(&GOOD.replace("source = 'pypi-wheel'", "source = 'conda'"), "conda");
        refused(&GOOD.replace("precision = 'int8'", "precision = 'int3'"), "int3");
        refused(&GOOD.replace("precision = 'int8'\n", ""), "precision");
        refused(&GOOD.replace("threads = 2", "threads = 0"), "threads");
        refused(&GOOD.replace("manylinux_2_27_aarch64", "manylinux_2_27_x86_64"), "ort.platform");
        refused(&GOOD.replace("api = 31", "api = 3"), "ort.api");
        refused(&GOOD.replace("api = 31", "api = 20"), "ort.api");
        let system = GOOD.replace(
            "source = 'pypi-wheel'\nplatform = 'manylinux_2_27_aarch64'\napi = 31",
            "source = 'system'\npath = '/usr/lib/libonnxruntime.so'\nversion = '1.20.0'\napi = 20",
        );
        assert!(load_text(&system).is_ok());
        refused(&system.replace("api = 20", "api = 22"), "ort.api");
        refused(&system.replace("'1.20.0'", "'twenty'"), "ort.version");
        refused(&GOOD.replace("aarch64-unknown-linux-gnu", "pi"), "target");
        refused(&GOOD.replace("'/opt/edgelm'", "'opt'"), "install_prefix");
        refused(
            &GOOD.replace("[[execution_providers]]\nkind = 'cpu'\n", "execution_providers = []\n"),
            "execution_providers",
        );
        refused(&format!("{GOOD}[serial]\nbaud = 9600\n"), "device");
        refused(&format!("{GOOD}[signatures]\nrequire = true\n"), "signatures.keys");
        refused(&format!("{GOOD}[signatures]\nkeys = ['../k.pub']\n"), "signatures.keys");
        refused(&format!("{GOOD}[signatures]\nkeys = ['k.pub']\nalgorithm = 'rsa'\n"), "algorithm");
    }

    #[test]
    fn the_profile_sets_providers_library_and_budget() {
        let mut b = load_text(&GOOD.replace(
            "[[execution_providers]]\nkind = 'cpu'\n",
            "[[execution_providers]]\nkind = 'cuda'\ndevice_id = 1\n[[execution_providers]]\nkind = 'cpu'\n",
        ))
        .unwrap();
        let place = Placement { board: Some(b.clone()), ort_lib: None };
        let opts = place.engine_options(0, KvCacheMode::default()).unwrap();
        assert_eq!(opts.decoder.threads, 2);
        assert_eq!(
            opts.decoder.execution_providers,
            vec![ExecutionProvider::Cuda { device_id: 1 }, ExecutionProvider::Cpu {}]
        );
        assert_eq!(opts.ort_lib, None);
        b.ort = OrtSource::System { path: "/usr/lib/libonnxruntime.so".into(), version: "1.20.0".into(), api: 20 };
        let place = Placement { board: Some(b.clone()), ort_lib: None };
        assert_eq!(
            place.engine_options(3, KvCacheMode::default()).unwrap().ort_lib,
            Some("/usr/lib/libonnxruntime.so".into())
        );
        let place = Placement { board: Some(b.clone()), ort_lib: Some("/x.so".into()) };
        assert_eq!(place.engine_options(3, KvCacheMode::default()).unwrap().ort_lib, Some("/x.so".into()));
        assert!(b.check_fits(50 << 20, 10 << 20).is_ok());
        assert!(b.check_fits(200 << 20, 0).unwrap_err().to_string().contains("budget of 100 MiB"));
        let keys: Vec<String> = b.describe().into_iter().map(|(k, _)| k).collect();
        for k in ["target", "ort.path", "ort.api", "execution_providers", "precision", "install_prefix", "notes"] {
            assert!(keys.iter().any(|x| x == k), "{k} not described: {keys:?}");
        }
    }
}
