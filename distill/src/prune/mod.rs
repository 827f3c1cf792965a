//! Pruning: `magnitude` zeroes the smallest weights (shapes unchanged, measures redundancy);
//! `structured` removes whole MLP units and KV groups so the matrices themselves shrink.

pub mod magnitude;
pub mod structured;

pub use magnitude::{prune, prune_checkpoint, PruneAmount, PruneOptions, PruneReport, PruneScope, TensorSparsity};
