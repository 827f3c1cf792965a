//! The tensor names of a llama-family checkpoint as `transformers` saves them, in one place:
//! every module that reads or writes weights by name builds the name here.

/// Token embedding `[vocab, hidden]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Final RMSNorm weight `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// LM head `[vocab, hidden]` (absent when tied to the embedding).
pub const LM_HEAD: &str = "lm_head.weight";
/// Layer norm before attention, inside a layer.
pub const INPUT_NORM: &str = "input_layernorm.weight";
/// Layer norm before the MLP, inside a layer.
pub const POST_ATTENTION_NORM: &str = "post_attention_layernorm.weight";

/// RMSNorm over each query head `[head_dim]` (Qwen3), inside a layer.
pub const Q_NORM: &str = "self_attn.q_norm.weight";
/// RMSNorm over each key head `[head_dim]` (Qwen3), inside a layer.
pub const K_NORM: &str = "self_attn.k_norm.weight";

/// Prefix of layer `i`'s tensors: `model.layers.{i}`.
pub fn layer(i: usize) -> String {
    format!("model.layers.{i}")
}

/// A tensor of layer `i`: `model.layers.{i}.{rest}`.
pub fn in_layer(i: usize, rest: &str) -> String {
    format!("model.layers.{i}.{rest}")
}

/// The block a projection belongs to: `self_attn` for q/k/v/o, `mlp` for gate/up/down.
pub fn block_of(proj: &str) -> &'static str {
    if matches!(proj, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    }
}

/// A projection module of layer `i` (`model.layers.{i}.self_attn.q_proj`), the name LoRA
/// adapters use; add `.weight` or `.bias` for its tensors.
pub fn projection(i: usize, proj: &str) -> String {
    format!("model.layers.{i}.{}.{proj}", block_of(proj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_ones_transformers_writes() {
        assert_eq!(projection(3, "q_proj"), "model.layers.3.self_attn.q_proj");
        assert_eq!(projection(0, "down_proj"), "model.layers.0.mlp.down_proj");
        assert_eq!(in_layer(1, INPUT_NORM), "model.layers.1.input_layernorm.weight");
    }
}
