//! The candle model is differentiable end to end: a next-token loss reaches every weight with a
//! non-zero gradient (candle's fused rms_norm, rope and softmax kernels would silently cut the
//! graph; the model is written without them), for each architecture variant.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use edgelm_distill::checkpoint::preset::{preset_config, random_weights};
use edgelm_distill::LlamaModel;

#[test]
fn every_weight_gets_a_nonzero_gradient() {
    for preset in ["tiny", "tiny-tied", "tiny-qwen2", "tiny-llama3", "tiny-qwen3"] {
        let cfg = preset_config(preset).unwrap();
        let vars: HashMap<String, Var> =
            random_weights(&cfg, 5).unwrap().into_iter().map(|(k, t)| (k, Var::from_tensor(&t).unwrap())).collect();
        let tensors: HashMap<String, Tensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let model = LlamaModel::from_tensors(&cfg, &tensors).unwrap();
        let ids: Vec<u32> = (0..12).map(|i| (3 + i * 29) % cfg.vocab_size as u32).collect();
        let input = Tensor::new(&ids[..11], &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let target = Tensor::new(&ids[1..], &candle_core::Device::Cpu).unwrap();
        let logits = model.forward(&input, &mut model.new_cache()).unwrap().squeeze(0).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &target).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in &vars {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{preset}: no gradient reaches {name}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{preset}: gradient of {name} is {norm}");
        }
    }
}
