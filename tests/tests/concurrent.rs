//! One engine shared by threads: sequences generated at once, their model steps interleaved on
//! one session or run as one batch, each give what they give alone.

use std::ops::ControlFlow;
use std::sync::Arc;

use edgelm_e2e::bundle;
use edgelm_runtime::{Engine, EngineOptions, GenerateParams, SamplingParams};

#[test]
fn concurrent_sequences_on_one_engine_match_their_runs_alone() {
    let engine = Arc::new(Engine::open(bundle("tiny"), &EngineOptions::default().with_threads(1)).unwrap());
    check_against_alone(engine, 4);
}

#[test]
fn batched_sequences_match_their_runs_alone() {
    // Every architecture the exporter writes: GQA and not, biases, one KV head, llama3 rope.
    for preset in ["tiny", "tiny-tied", "tiny-qwen2", "tiny-llama3", "tiny-mistral"] {
        let mut engine = Engine::open(bundle(preset), &EngineOptions::default().with_threads(1)).unwrap();
        // Fewer places than sequences: the last one waits for a place, and sequences leaving
        // from lower slots move the others down.
        assert!(engine.enable_batching(3, true).unwrap(), "{preset}: the bundle shares its KV cache");
        assert_eq!(engine.batch_sequences(), 3);
        let engine = Arc::new(engine);
        check_against_alone(Arc::clone(&engine), 4);
        let stats = engine.batch_stats();
        assert!(stats.rows > stats.steps, "{preset}: decode steps were batched: {stats:?}");
    }
}

/// Runs `n` sequences of different lengths one by one, then all at once on threads, and
/// compares the tokens.
fn check_against_alone(engine: Arc<Engine>, n: u32) {
    let prompts: Vec<Vec<u32>> = (0..n).map(|i| (1..=(3 + 5 * i)).map(|t| (t * 7 + i) % 200 + 1).collect()).collect();
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

#[test]
fn a_prompt_starting_like_an_earlier_one_reuses_its_cache_and_answers_the_same() {
    let opts = EngineOptions::default().with_threads(1);
    let alone = Engine::open(bundle("tiny"), &opts).unwrap();
    let mut batched = Engine::open(bundle("tiny"), &opts).unwrap();
    assert!(batched.enable_batching(2, true).unwrap());
    let first: Vec<u32> = (1..=40).map(|t| (t * 13) % 200 + 1).collect();
    let mut longer = first.clone();
    longer.extend([7, 8, 9, 10]);
    let mut diverging = first[..25].to_vec();
    diverging.extend([3, 4, 5]);
    let params = GenerateParams::default().with_max_new_tokens(16).with_ignore_eos(true);
    let run = |e: &Engine, p: &[u32]| e.generate(p, &params, |_| ControlFlow::Continue(())).unwrap().generated_ids;
    let mut reused = 0;
    // The same prompt twice, one that continues it, one that leaves it part way, an unrelated
    // one (which takes the other, empty slot: the cache it leaves is moved to the first slot,
    // the earlier one to the second), and the first again (its cache is moved back).
    let unrelated: Vec<u32> = (1..=30).map(|t| (t * 5) % 150 + 20).collect();
    for (name, prompt) in [
        ("first", &first),
        ("again", &first),
        ("longer", &longer),
        ("diverging", &diverging),
        ("unrelated", &unrelated),
        ("back", &first),
    ] {
        assert_eq!(run(&batched, prompt), run(&alone, prompt), "{name}: differs from a fresh run");
        let now = batched.batch_stats().reused;
        match name {
            "first" | "unrelated" => assert_eq!(now, reused, "{name}: nothing to reuse"),
            _ => assert!(now > reused, "{name}: reused no cached position"),
        }
        reused = now;
    }
}

#[test]
fn without_prompt_reuse_a_repeated_prompt_runs_whole() {
    let mut engine = Engine::open(bundle("tiny"), &EngineOptions::default().with_threads(1)).unwrap();
    assert!(engine.enable_batching(2, false).unwrap());
    let prompt: Vec<u32> = (1..=30).map(|t| (t * 11) % 200 + 1).collect();
    let params = GenerateParams::default().with_max_new_tokens(8).with_ignore_eos(true);
    let first = engine.generate(&prompt, &params, |_| ControlFlow::Continue(())).unwrap().generated_ids;
    let again = engine.generate(&prompt, &params, |_| ControlFlow::Continue(())).unwrap().generated_ids;
    assert_eq!(first, again);
    assert_eq!(engine.batch_stats().reused, 0);
}
