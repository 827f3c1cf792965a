//! Execution providers: the ONNX Runtime backends a session tries, in order of preference.
//!
//! A list such as `[tensorrt, cuda, cpu]` (a Jetson board profile) means: use the first ones
//! this ONNX Runtime library offers; `cpu` allows falling back to ONNX Runtime's own CPU
//! kernels when none of those before it can be used. A list without `cpu` whose providers are
//! all missing is an error, not a silent run on the CPU. ONNX Runtime always runs on the CPU
//! the operators a provider does not take, whatever the list says.

use std::path::PathBuf;

use ort::ep::{ExecutionProvider as _, ExecutionProviderDispatch};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One execution provider and its options (`kind = "..."` in a board profile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ExecutionProvider {
    /// ONNX Runtime's CPU kernels, in every build. (Variants without options are written
    /// with braces so that a stray key under them is refused too.)
    Cpu {},
    /// XNNPACK's CPU kernels (ARM NEON, x86), in builds made with it.
    Xnnpack {},
    /// NVIDIA CUDA, in GPU builds (onnxruntime-gpu, such as the wheel built for JetPack).
    Cuda {
        /// GPU index.
        #[serde(default)]
        device_id: i32,
    },
    /// NVIDIA TensorRT, in builds made with it (the onnxruntime-gpu wheel built for JetPack).
    Tensorrt {
        /// GPU index.
        #[serde(default)]
        device_id: i32,
        /// Let TensorRT run layers in fp16.
        #[serde(default)]
        fp16: bool,
        /// Folder where built engines are kept between runs (building one takes minutes on
        /// a Jetson); none: built at every start.
        #[serde(default)]
        engine_cache: Option<PathBuf>,
    },
}

impl ExecutionProvider {
    /// The name used in profiles and messages (`cpu`, `xnnpack`, `cuda`, `tensorrt`).
    pub fn name(&self) -> &'static str {
        match self {
            ExecutionProvider::Cpu {} => "cpu",
            ExecutionProvider::Xnnpack {} => "xnnpack",
            ExecutionProvider::Cuda { .. } => "cuda",
            ExecutionProvider::Tensorrt { .. } => "tensorrt",
        }
    }

    /// Whether the loaded ONNX Runtime library was built with this provider.
    pub fn is_available(&self) -> Result<bool> {
        crate::ortlib::init(None)?;
        let found = match self {
            ExecutionProvider::Cpu {} => Ok(true),
            ExecutionProvider::Xnnpack {} => ort::ep::XNNPACK::is_available(),
            ExecutionProvider::Cuda { .. } => ort::ep::CUDA::is_available(),
            ExecutionProvider::Tensorrt { .. } => ort::ep::TensorRT::is_available(),
        };
        found.map_err(Error::Ort)
    }

    /// The provider with its options, to register on a session; `None` for the CPU, which
    /// needs no registration.
    fn dispatch(&self, threads: usize) -> Option<ExecutionProviderDispatch> {
        match self {
            ExecutionProvider::Cpu {} => None,
            ExecutionProvider::Xnnpack {} => {
                let ep = ort::ep::XNNPACK::default();
                let ep = match std::num::NonZeroUsize::new(threads) {
                    Some(n) => ep.with_intra_op_num_threads(n),
                    None => ep,
                };
                Some(ep.build())
            }
            ExecutionProvider::Cuda { device_id } => Some(ort::ep::CUDA::default().with_device_id(*device_id).build()),
            ExecutionProvider::Tensorrt { device_id, fp16, engine_cache } => {
                let mut ep = ort::ep::TensorRT::default().with_device_id(*device_id).with_fp16(*fp16);
                if let Some(dir) = engine_cache {
                    ep = ep.with_engine_cache(true).with_engine_cache_path(dir.display());
                }
                Some(ep.build())
            }
        }
    }
}

/// What a session runs on, resolved from a list of preferences against the loaded library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    /// Providers to register, in order (the CPU is never listed: it is always there).
    pub register: Vec<ExecutionProvider>,
    /// Whether the list allows falling back to the CPU alone.
    pub cpu_fallback: bool,
    /// Providers asked for before the first `cpu` that this library lacks.
    pub missing: Vec<&'static str>,
}

/// Resolves `wanted` against what `available` says of each provider. An empty list is the CPU
/// alone. Fails when nothing before the first `cpu` is available and the list has no `cpu`.
pub fn plan(
    wanted: &[ExecutionProvider],
    available: impl Fn(&ExecutionProvider) -> Result<bool>,
) -> Result<ProviderPlan> {
    if wanted.is_empty() {
        return Ok(ProviderPlan { register: vec![], cpu_fallback: true, missing: vec![] });
    }
    let mut out = ProviderPlan { register: vec![], cpu_fallback: false, missing: vec![] };
    for ep in wanted {
        if *ep == (ExecutionProvider::Cpu {}) {
            out.cpu_fallback = true;
            break;
        }
        if available(ep)? {
            out.register.push(ep.clone());
        } else {
            out.missing.push(ep.name());
        }
    }
    if out.register.is_empty() && !out.cpu_fallback {
        return Err(Error::NoExecutionProvider {
            wanted: wanted.iter().map(ExecutionProvider::name).collect::<Vec<_>>().join(", "),
        });
    }
    Ok(out)
}

/// Registers the plan's providers on a session builder, in order. A provider the library
/// offers can still fail to start (its CUDA libraries missing on the device): it is skipped
/// with a warning, and when none started and the list does not allow the CPU, that is an error.
pub(crate) fn register(
    mut builder: ort::session::builder::SessionBuilder,
    plan: &ProviderPlan,
    threads: usize,
) -> Result<ort::session::builder::SessionBuilder> {
    for m in &plan.missing {
        tracing::warn!("execution provider `{m}` is not in this ONNX Runtime library; trying the next one");
    }
    let (mut started, mut failures) = (0, Vec::new());
    for ep in &plan.register {
        let Some(dispatch) = ep.dispatch(threads) else { continue };
        builder = match builder.with_execution_providers([dispatch.error_on_failure()]) {
            Ok(b) => {
                started += 1;
                b
            }
            Err(e) => {
                tracing::warn!("execution provider `{}` did not start ({e}); trying the next one", ep.name());
                failures.push(format!("{}: {e}", ep.name()));
                e.recover()
            }
        };
    }
    if started == 0 && !plan.register.is_empty() && !plan.cpu_fallback {
        return Err(Error::ExecutionProviderFailed { reasons: failures.join("; ") });
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuda() -> ExecutionProvider {
        ExecutionProvider::Cuda { device_id: 0 }
    }

    #[test]
    fn the_first_available_providers_are_taken_and_cpu_allows_falling_back() {
        let trt = ExecutionProvider::Tensorrt { device_id: 0, fp16: true, engine_cache: None };
        let list = [trt.clone(), cuda(), ExecutionProvider::Cpu {}, ExecutionProvider::Xnnpack {}];
        // A GPU build: both GPU providers, in order; nothing after `cpu` is looked at.
        let p = plan(&list, |_| Ok(true)).unwrap();
        assert_eq!(p.register, vec![trt.clone(), cuda()]);
        assert!(p.cpu_fallback && p.missing.is_empty());
        // A CPU build: nothing to register, both named as missing, the CPU allowed.
        let p = plan(&list, |ep| Ok(*ep == ExecutionProvider::Cpu {})).unwrap();
        assert!(p.register.is_empty() && p.cpu_fallback);
        assert_eq!(p.missing, vec!["tensorrt", "cuda"]);
        // Without `cpu` in the list a CPU build is refused, naming what was asked for.
        let err = plan(&[trt, cuda()], |ep| Ok(*ep == ExecutionProvider::Cpu {})).unwrap_err();
        assert!(matches!(err, Error::NoExecutionProvider { .. }), "{err}");
        assert!(err.to_string().contains("tensorrt, cuda"), "{err}");
        // An empty list is the CPU alone.
        assert_eq!(
            plan(&[], |_| Ok(false)).unwrap(),
            ProviderPlan { register: vec![], cpu_fallback: true, missing: vec![] }
        );
    }

    #[test]
    fn profiles_spell_providers_with_their_options() {
        #[derive(Deserialize)]
        struct List {
            execution_providers: Vec<ExecutionProvider>,
        }
        let l: List = toml::from_str(
            "[[execution_providers]]\nkind = \"tensorrt\"\nfp16 = true\nengine_cache = \"/var/cache/trt\"\n\
             [[execution_providers]]\nkind = \"cuda\"\ndevice_id = 1\n[[execution_providers]]\nkind = \"cpu\"\n",
        )
        .unwrap();
        assert_eq!(
            l.execution_providers,
            vec![
                ExecutionProvider::Tensorrt { device_id: 0, fp16: true, engine_cache: Some("/var/cache/trt".into()) },
                ExecutionProvider::Cuda { device_id: 1 },
                ExecutionProvider::Cpu {}
            ]
        );
        let err = toml::from_str::<List>("[[execution_providers]]\nkind = \"cuda\"\nfp16 = true\n").err().unwrap();
        assert!(err.to_string().contains("fp16"), "{err}");
        let err = toml::from_str::<List>("[[execution_providers]]\nkind = \"npu\"\n").err().unwrap();
        assert!(err.to_string().contains("npu"), "{err}");
    }
}
