//! Opening an ONNX graph in an ONNX Runtime session: one place for the settings every graph
//! gets, decoder or encoder.

use std::path::Path;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use crate::error::{Error, Result};

/// Opens `model` with every graph optimisation, `threads` intra-op threads (0: ONNX Runtime's
/// choice, one per physical core) and idle threads spinning or not between operators.
pub(crate) fn open(model: &Path, threads: usize, spin: bool) -> Result<Session> {
    let env = crate::ortlib::init(None)?;
    // A builder error hands the builder back (`recover()`); there is nothing to retry here, so
    // only its message is kept.
    let setting = |e: ort::Error<ort::session::builder::SessionBuilder>| Error::Ort(e.into());
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(setting)?
        .with_intra_op_spinning(spin)
        .map_err(setting)?;
    if threads > 0 {
        builder = builder.with_intra_threads(threads).map_err(setting)?;
    }
    Ok(builder.commit_from_file(model)?)
}
