//! One engine shared by threads: sequences generated at once, their model steps interleaved on
//! one session, each give exactly what they give alone.

use std::ops::ControlFlow;
use std::sync::Arc;

use edgelm_e2e::bundle;
use edgelm_runtime::{Engine, EngineOptions, GenerateParams, SamplingParams};

#[test]
fn concurrent_sequences_on_one_engine_match_their_runs_alone() {
    let engine = Arc::new(Engine::open(bundle("tiny"), &EngineOptions::default().with_threads(1)).unwrap());
    let prompts: Vec<Vec<u32>> =
        (0..4u32).map(|i| (1..=(3 + 5 * i)).map(|t| (t * 7 + i) % 200 + 1).collect()).collect();
    let params = |i: usize| {
        let p = GenerateParams::default().with_max_new_tokens(24 + 8 * i).with_ignore_eos(true);
        // Two greedy, two sampled with their own seeds.
        if i.is_multiple_of(2) {
            p
        } else {
            p.with_sampling(SamplingParams::default().with_temperature(0.9).with_top_k(20).with_seed(i as u64))
        }
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| engine.generate(p, &params(i), |_| ControlFlow::Continue(())).unwrap().generated_ids)
        .collect();
    let threads: Vec<_> = prompts
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, p)| {
            let e = Arc::clone(&engine);
            let params = params(i);
            std::thread::spawn(move || {
                let mut steps = 0;
                let g = e
                    .generate(&p, &params, |event| {
                        steps += usize::from(event.id.is_some());
                        // Let the other sequences take the session between steps.
                        std::thread::yield_now();
                        ControlFlow::Continue(())
                    })
                    .unwrap();
                (g.generated_ids, steps)
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (ids, steps) = t.join().unwrap();
        assert_eq!(ids, alone[i], "sequence {i} differs when run beside the others");
        assert_eq!(steps, ids.len());
    }
}
