//! A sequence's text as its tokens arrive: what can be sent so far, and where a stop string ends
//! it.
//!
//! The whole sequence is decoded again at every token (as `collie generate` streams), so the
//! text is always the decoding of all tokens, never a concatenation of per-token pieces that a
//! byte-level tokenizer could split inside a character. Text that could still become a stop
//! string is held back until it cannot.

use std::sync::Arc;

use collie_io::tokenizer::TokenizerBundle;

/// The text of one generated sequence.
pub struct TextStream {
    tokenizer: Arc<TokenizerBundle>,
    stops: Vec<String>,
    ids: Vec<u32>,
    /// The decoding of `ids` (cut at a stop string once one appeared).
    text: String,
    /// How much of `text` was handed out.
    sent: usize,
    stopped: bool,
}

impl TextStream {
    /// An empty sequence that ends at the first of `stops` (empty strings are ignored).
    pub fn new(tokenizer: Arc<TokenizerBundle>, stops: Vec<String>) -> Self {
        TextStream {
            tokenizer,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ids: Vec::new(),
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Adds a token; returns the text that became safe to send, which may be empty.
    pub fn push(&mut self, id: u32) -> String {
        if self.stopped {
            return String::new();
        }
        self.ids.push(id);
        let Ok(text) = self.tokenizer.decode(&self.ids, true) else {
            return String::new();
        };
        // A byte-level tokenizer may end inside a character: wait for the rest of it.
        if text.ends_with('\u{fffd}') || !text.starts_with(&self.text[..self.sent]) {
            return String::new();
        }
        self.text = text;
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        if let Some(at) = earliest {
            self.text.truncate(at);
            self.stopped = true;
            return self.take(at);
        }
        let held = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.text, s))
            .max()
            .unwrap_or(0);
        self.take(self.text.len() - held)
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Tokens pushed (those after a stop string excluded).
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// The rest of the text once no token follows.
    pub fn finish(&mut self) -> String {
        if !self.stopped {
            if let Ok(text) = self.tokenizer.decode(&self.ids, true) {
                if text.starts_with(&self.text[..self.sent]) {
                    self.text = text;
                }
            }
        }
        self.take(self.text.len())
    }

    /// The whole text (after [`TextStream::finish`]: what the client received).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text from what was sent up to byte `end`.
    fn take(&mut self, end: usize) -> String {
        if end <= self.sent {
            return String::new();
        }
        let piece = self.text[self.sent..end].to_string();
        self.sent = end;
        piece
    }
}

/// Length of the longest end of `text` that is a proper beginning of `stop` (on a character
/// boundary of both).
fn partial_suffix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .filter(|&n| n > 0 && text.ends_with(&stop[..n]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn holds_back_only_what_could_begin_a_stop_string() {
        assert_eq!(partial_suffix("Hello wor", "world"), 3);
        assert_eq!(partial_suffix("Hello w", "world"), 1);
        assert_eq!(partial_suffix("Hello", "world"), 0);
        // The whole stop string is a match, not a partial one.
        assert_eq!(partial_suffix("a world", "world"), 0);
        assert_eq!(partial_suffix("x é", "éa"), "é".len());
    }
}
