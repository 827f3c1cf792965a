//! Training data: the built-in device-command task and the preparation of users' own data, both
//! as instruction triples (`{"instruction", "input", "output"}`, one JSON object per line).

pub mod prepare;
pub mod task;

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// One instruction example.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    /// What to do.
    pub instruction: String,
    /// The input to do it on (may be empty).
    #[serde(default)]
    pub input: String,
    /// The expected answer.
    pub output: String,
}

impl Example {
    /// The example's three texts (instruction, input, output), e.g. to train a tokenizer on.
    pub fn texts(&self) -> [&str; 3] {
        [&self.instruction, &self.input, &self.output]
    }
}

/// Writes examples as JSONL.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let file = std::fs::File::create(path).at(path)?;
    let mut w = std::io::BufWriter::new(file);
    for e in examples {
        serde_json::to_writer(&mut w, e)
            .map_err(|e| Error::Format { path: path.to_path_buf(), what: e.to_string() })?;
        w.write_all(b"\n").at(path)?;
    }
    w.flush().at(path)
}

/// Reads JSONL examples; a malformed line is an error naming the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let file = std::fs::File::open(path).at(path)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.at(path)?;
        if line.trim().is_empty() {
            continue;
        }
        let e: Example = serde_json::from_str(&line).map_err(|e| Error::DataLine {
            path: path.to_path_buf(),
            line: i + 1,
            what: format!("not an instruction triple: {e}"),
        })?;
        out.push(e);
    }
    Ok(out)
}
