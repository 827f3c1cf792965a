//! Per-token cost of the C ABI against the Rust API: the same bundle, prompt and settings
//! through `edgelm_generate_ids` (a C program linked to libedgelm.so, with a per-token
//! callback) and through `Engine::generate` in Rust, alternating, medians compared.
//! Run: `cargo bench -p edgelm-e2e --bench capi_overhead` (needs `cargo build --release`).

use std::ops::ControlFlow;
use std::process::Command;

use edgelm_e2e::{bundle, root, scratch};
use edgelm_runtime::metrics::median;
use edgelm_runtime::{Engine, EngineOptions, GenerateParams};

fn main() {
    let preset = std::env::var("EDGELM_BENCH_PRESET").unwrap_or_else(|_| "tiny".into());
    let b = bundle(&preset);
    let lib = root().join("target/release");
    let exe = scratch().join("bench_capi");
    let ok = Command::new("gcc")
        .args(["-O2", "-std=c11", "-I"])
        .arg(root().join("include"))
        .arg(root().join("tests/c/bench_capi.c"))
        .arg(format!("-L{}", lib.display()))
        .args(["-ledgelm", &format!("-Wl,-rpath,{}", lib.display()), "-o"])
        .arg(&exe)
        .status()
        .unwrap();
    assert!(ok.success());
    let prompt: Vec<u32> = (0..32).map(|i| 3 + (i * 37) % 300).collect();
    let csv = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let (new, runs) = (128usize, 9usize);
    let engine = Engine::open(&b, &EngineOptions::default()).unwrap();
    let p = GenerateParams::default().with_max_new_tokens(new).with_ignore_eos(true);
    let (mut rust, mut c) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let mut r = Vec::new();
        for i in 0..=runs {
            let g = engine.generate(&prompt, &p, |_| ControlFlow::Continue(())).unwrap();
            if i > 0 {
                r.push(g.metrics.decode_tokens_per_s);
            }
        }
        rust.push(median(r));
        let out = Command::new(&exe).arg(&b).arg(runs.to_string()).arg(new.to_string()).arg(&csv).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        c.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>().unwrap());
    }
    let (r, cc) = (median(rust), median(c));
    println!("bundle {preset}: decode tokens/s  Rust API {r:.0}  C ABI {cc:.0}  C/Rust {:.3}", cc / r);
}
