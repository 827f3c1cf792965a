//! Stop strings over streamed text: text that might be the start of a stop string is held
//! back until it is clear either way, so a stop string never reaches the output.

/// Watches streamed text for any of a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to do after a piece of text was pushed.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (possibly empty) and go on.
    Continue(String),
    /// A stop string was found: emit this text (everything before the stop) and stop.
    Stop(String),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), pending: String::new() }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(piece.to_owned());
        }
        self.pending.push_str(piece);
        let first = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first {
            let before = self.pending[..at].to_owned();
            self.pending.clear();
            return StopOutcome::Stop(before);
        }
        // Hold back the longest tail of `pending` that begins some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    hold = hold.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let mut m = StopMatcher::new(&["\nUser:".to_owned()]);
        let mut out = String::new();
        for p in ["Hello", " there\nUs", "er: more"] {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stop(t) => {
                    out.push_str(&t);
                    assert_eq!(out, "Hello there");
                    return;
                }
            }
        }
        panic!("stop string not detected");
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(&["STOP".to_owned()]);
        assert_eq!(m.push("abc ST"), StopOutcome::Continue("abc ".into()));
        assert_eq!(m.push("ay"), StopOutcome::Continue("STay".into()));
        assert_eq!(m.finish(), "");
    }
}
