//! The loaded model and the requests the worker runs on it, one at a time.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use edgelm_protocol::{ErrorCode, GenParams, Message, Stats, MAX_EMBED, MAX_FRAME, MAX_PIECE, MAX_PROMPT};
use edgelm_runtime::{EngineOptions, Model};

use super::line::{Outgoing, Shared};
use super::wire::{self, bounded, error_frame, runtime_error};

/// State that outlives one connection: the loaded model and the last stats.
pub struct Board {
    /// Engine settings for every bundle loaded.
    pub engine: EngineOptions,
    /// Folder LoadModel paths are resolved in; LoadModel is refused without one.
    pub models_dir: Option<PathBuf>,
    model: Option<(String, Model)>,
    last_stats: Stats,
}

impl Board {
    pub fn new(engine: EngineOptions, models_dir: Option<PathBuf>) -> Self {
        Board { engine, models_dir, model: None, last_stats: Stats::default() }
    }

    /// Loads a bundle of either kind, replacing the current model.
    pub fn load(&mut self, dir: &Path) -> edgelm_runtime::Result<()> {
        let m = Model::open(dir, &self.engine)?;
        self.model = Some((model_name(dir), m));
        Ok(())
    }

    fn info(&self) -> Message {
        let (model, context) = match &self.model {
            None => ("", 0),
            Some((n, m)) => (n.as_str(), m.context_length() as u32),
        };
        Message::Info {
            protocol: edgelm_protocol::PROTOCOL_VERSION,
            runtime: bounded(env!("CARGO_PKG_VERSION")),
            model: bounded(model),
            context,
            max_prompt: MAX_PROMPT as u16,
            max_piece: MAX_PIECE as u16,
            max_frame: MAX_FRAME as u16,
        }
    }
}

fn model_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// A LoadModel path: relative, inside the models folder.
pub fn resolve_model(root: Option<&Path>, rel: &str) -> Result<PathBuf, String> {
    let root = root.ok_or("this board loads no models over the link (start edgelm serve with --models-dir)")?;
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("model path `{rel}` must be a plain relative path inside the models folder"));
    }
    Ok(root.join(p))
}

/// Runs admitted requests until the link closes.
pub fn work_loop(board: &mut Board, req_rx: Receiver<Message>, out_tx: &Sender<Outgoing>, shared: &Shared) {
    loop {
        let req = match req_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) if !shared.closed.load(Ordering::SeqCst) => continue,
            Err(_) => return,
        };
        let last = run(board, req, out_tx, shared);
        // The request stops counting against the queue before its last frame is queued: a
        // client that has read that frame may send again and finds the room it left.
        shared.finished_request();
        let _ = out_tx.send(last);
    }
}

fn frame(m: Message) -> Outgoing {
    Outgoing::Frame(Box::new(m))
}

/// Runs one request; returns what ends its answer (the worker sends it).
fn run(board: &mut Board, req: Message, out_tx: &Sender<Outgoing>, shared: &Shared) -> Outgoing {
    match req {
        Message::Hello { .. } => frame(board.info()),
        Message::GetStats => frame(Message::StatsReply { stats: board.last_stats }),
        Message::Embed { text } => match &mut board.model {
            Some((_, Model::Encoder(enc))) => match enc.embed(&text) {
                Ok(v) => {
                    let mut chunks: Vec<&[f32]> = v.chunks(MAX_EMBED).collect();
                    let last = chunks.pop().unwrap_or_default();
                    for (i, c) in chunks.iter().enumerate() {
                        let values = heapless::Vec::from_slice(c).unwrap_or_default();
                        let _ = out_tx.send(frame(Message::Embedding { index: i as u16, last: false, values }));
                    }
                    let values = heapless::Vec::from_slice(last).unwrap_or_default();
                    frame(Message::Embedding { index: chunks.len() as u16, last: true, values })
                }
                Err(e) => frame(runtime_error(&e)),
            },
            Some(_) => frame(error_frame(ErrorCode::Unsupported, "embeddings need an encoder bundle")),
            None => frame(error_frame(ErrorCode::NoModel, "no model loaded; send LoadModel")),
        },
        Message::LoadModel { path } => match resolve_model(board.models_dir.as_deref(), &path) {
            Ok(dir) => match board.load(&dir) {
                Ok(()) => frame(Message::Ack),
                Err(e) => frame(error_frame(ErrorCode::Runtime, &e.to_string())),
            },
            Err(msg) => frame(error_frame(ErrorCode::InvalidRequest, &msg)),
        },
        Message::Generate { prompt, params } => generate(board, &prompt, &params, false, out_tx, shared),
        Message::GenerateRaw { prompt, params } => generate(board, &prompt, &params, true, out_tx, shared),
        other => frame(error_frame(
            ErrorCode::InvalidRequest,
            &format!("a board does not accept message kind {}", other.kind()),
        )),
    }
}

/// Answers a Generate: one Error if the request is refused (checked in full before anything
/// is sent), else Ack, the pieces and Done; an Error after the Ack only if the model fails
/// while generating.
fn generate(
    board: &mut Board,
    prompt: &str,
    params: &GenParams,
    raw: bool,
    out_tx: &Sender<Outgoing>,
    shared: &Shared,
) -> Outgoing {
    let engine = match &mut board.model {
        Some((_, Model::CausalLm(e))) => e,
        Some(_) => return frame(error_frame(ErrorCode::Unsupported, "the loaded model is an encoder: send Embed")),
        None => return frame(error_frame(ErrorCode::NoModel, "no model loaded; send LoadModel")),
    };
    let gp = wire::generate_params(params);
    let ids = match engine.encode_prompt(prompt, raw).and_then(|ids| engine.check_request(&ids, &gp).map(|()| ids)) {
        Ok(ids) => ids,
        Err(e) => return frame(runtime_error(&e)),
    };
    // A Cancel from here on, even one sent before the Ack arrived, is for this answer.
    shared.cancel.store(false, Ordering::SeqCst);
    let (started_tx, started_rx) = mpsc::sync_channel(1);
    if out_tx.send(Outgoing::NewAnswer(started_tx)).is_err() || started_rx.recv().is_err() {
        return Outgoing::Wake; // the writer is gone: the link closed
    }
    let result = engine.generate_until(
        &ids,
        &gp,
        || shared.cancel.load(Ordering::SeqCst) || shared.closed.load(Ordering::SeqCst),
        |ev| {
            if !ev.text.is_empty() {
                shared.push_text(ev.text, out_tx);
            }
            std::ops::ControlFlow::Continue(())
        },
    );
    match result {
        Ok(g) => {
            let stats = wire::stats(&g);
            board.last_stats = stats;
            Outgoing::Done(stats)
        }
        // After pending text: the Error ends the answer in place of Done. After the Ack every
        // failure is the model failing while generating (a piece the tokenizer cannot decode
        // included): Runtime, as the protocol says.
        Err(e) => Outgoing::Failed(Box::new(error_frame(ErrorCode::Runtime, &e.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_stay_inside_the_models_folder() {
        let root = Path::new("/models");
        assert_eq!(resolve_model(Some(root), "tiny").unwrap(), Path::new("/models/tiny"));
        for bad in ["../etc", "/abs", "a/../../b", ""] {
            assert!(resolve_model(Some(root), bad).is_err(), "{bad}");
        }
        assert!(resolve_model(None, "tiny").is_err());
    }
}
