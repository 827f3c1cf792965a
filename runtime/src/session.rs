//! Opening an ONNX graph in an ONNX Runtime session: one place for the settings every graph
//! gets, decoder or encoder.

use std::path::Path;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use crate::decoder::DecoderOptions;
use crate::error::{Error, Result};
use crate::providers::ExecutionProvider;

/// Opens `model` with every graph optimisation, `opts.threads` intra-op threads (0: ONNX
/// Runtime's choice, one per physical core), idle threads spinning or not between operators,
/// and the first of `opts.execution_providers` that this library offers and that starts.
pub(crate) fn open(model: &Path, opts: &DecoderOptions) -> Result<Session> {
    let env = crate::ortlib::init(None)?;
    let plan = crate::providers::plan(&opts.execution_providers, ExecutionProvider::is_available)?;
    // A builder error hands the builder back (`recover()`); there is nothing to retry here, so
    // only its message is kept.
    let setting = |e: ort::Error<ort::session::builder::SessionBuilder>| Error::Ort(e.into());
    // XNNPACK runs its own thread pool beside the session's: session threads spinning while it
    // works would take its cores (ONNX Runtime's advice is to stop them spinning). The session
    // keeps its threads, since the operators XNNPACK lacks (MatMulNBits, attention) run there.
    let xnnpack = plan.register.iter().any(|ep| matches!(ep, ExecutionProvider::Xnnpack {}));
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(setting)?
        .with_intra_op_spinning(opts.spin && !xnnpack)
        .map_err(setting)?;
    if opts.threads > 0 {
        builder = builder.with_intra_threads(opts.threads).map_err(setting)?;
    }
    let mut builder = crate::providers::register(builder, &plan, opts.threads)?;
    Ok(builder.commit_from_file(model)?)
}

/// First ONNX Runtime release whose `GatherBlockQuantized` takes the `bits` attribute (8-bit
/// tables, and 4-bit ones packed in bytes), the form of edgelm's quantized token tables.
const QUANTIZED_TABLES_SINCE: (u32, u32) = (1, 23);

/// Turns a graph the loaded library refused into an error that says what to do, when the cause
/// is known: a quantized token table (ONNX Runtime's message names `GatherBlockQuantized`) on a
/// release older than [`QUANTIZED_TABLES_SINCE`]. Any other error is returned as it is.
pub(crate) fn explain_refusal(e: Error, dir: &Path) -> Error {
    let old = crate::ortlib::loaded_release().is_some_and(|r| r < QUANTIZED_TABLES_SINCE);
    match e {
        Error::Ort(ref ort) if old && ort.to_string().contains("GatherBlockQuantized") => {
            Error::QuantizedTableNeedsNewerOrt {
                path: dir.to_path_buf(),
                version: crate::ortlib::loaded_version().unwrap_or("?").to_owned(),
                detail: ort.to_string(),
            }
        }
        e => e,
    }
}
