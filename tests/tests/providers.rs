//! Execution providers from a list of preferences, against the real ONNX Runtime library the
//! tests load (the PyPI CPU build: no CUDA, no TensorRT).

use std::ops::ControlFlow;

use edgelm_e2e::bundle;
use edgelm_runtime::{Engine, EngineOptions, Error, ExecutionProvider, GenerateParams};

fn greedy(opts: &EngineOptions) -> Vec<u32> {
    let engine = Engine::open(bundle("tiny"), opts).unwrap();
    let params = GenerateParams::default().with_max_new_tokens(6);
    engine.generate(&[1, 2, 3], &params, |_| ControlFlow::Continue(())).unwrap().generated_ids
}

#[test]
fn a_missing_gpu_provider_falls_back_to_the_cpu_only_when_the_list_allows_it() {
    assert!(ExecutionProvider::Cpu {}.is_available().unwrap());
    let cuda = ExecutionProvider::Cuda { device_id: 0 };
    let trt = ExecutionProvider::Tensorrt { device_id: 0, fp16: true, engine_cache: None };
    assert!(!cuda.is_available().unwrap(), "these tests expect ONNX Runtime's CPU build");
    // Allowed: the same tokens as the plain CPU session.
    let cpu = greedy(&EngineOptions::default());
    let fallback =
        EngineOptions::default().with_execution_providers(vec![trt.clone(), cuda.clone(), ExecutionProvider::Cpu {}]);
    assert_eq!(greedy(&fallback), cpu);
    // Not allowed: a typed error naming what was asked for, not a silent CPU run.
    let strict = EngineOptions::default().with_execution_providers(vec![trt, cuda]);
    match Engine::open(bundle("tiny"), &strict) {
        Err(e @ Error::NoExecutionProvider { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("tensorrt, cuda") && msg.contains("add `cpu`"), "{msg}");
        }
        other => panic!("expected NoExecutionProvider, got {:?}", other.err()),
    }
}
