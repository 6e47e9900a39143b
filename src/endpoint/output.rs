//! One stream's output: the bytes queued for the server, what of them the shell wrote, where
//! each element begins (so that what a lost stream could not send goes out whole on another),
//! and the stall clock (since when the output waiting has made no progress), in monotonic
//! milliseconds.

use std::collections::VecDeque;

/// Queued output past which a stream is not read until the server takes some: a server that
/// stops reading but keeps sending cannot make the session buffer without bound.
pub const PAUSE_READING_AT: usize = 1024 * 1024;
/// Output waiting on one stream past which the stream is given up (its server takes too
/// little of it; what waits goes out on another stream, if one is up). Reading it pauses long
/// before, at [`PAUSE_READING_AT`].
pub const MAX_UNSENT: usize = 8 * PAUSE_READING_AT;

/// The output of one stream.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// `out[sent..]` is still to be written.
    out: Vec<u8>,
    sent: usize,
    /// Where in `out` each element queued begins (to take back the unsent ones whole).
    starts: VecDeque<usize>,
    /// Since when the output waiting has made no progress (`None` while nothing waits).
    waiting_since: Option<u64>,
}

impl Output {
    /// Appends the bytes of one whole element (or of several, as one piece: bytes taken
    /// from another stream).
    pub(crate) fn element(&mut self, bytes: &[u8], now: u64) {
        if bytes.is_empty() {
            return;
        }
        self.starts.push_back(self.out.len());
        self.out.extend_from_slice(bytes);
        self.queued(now);
    }

    /// Appends bytes that are not an element (the stream header or footer): never taken
    /// back on their own.
    pub(crate) fn raw(&mut self, bytes: &[u8], now: u64) {
        self.out.extend_from_slice(bytes);
        self.queued(now);
    }

    /// The buffer elements are serialised into, at its end: call [`Output::appended`] with
    /// the length it had before once done.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// An element was serialised at `start` by [`Output::buffer`].
    pub(crate) fn appended(&mut self, start: usize, now: u64) {
        if self.out.len() > start {
            self.starts.push_back(start);
            self.queued(now);
        }
    }

    fn queued(&mut self, now: u64) {
        if self.waiting_since.is_none() && self.out.len() > self.sent {
            self.waiting_since = Some(now);
        }
    }

    /// What waits to be written.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.out[self.sent..]
    }

    /// Bytes queued and not yet written.
    pub(crate) fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Since when the output waiting has made no progress, if any waits.
    pub(crate) fn waiting_since(&self) -> Option<u64> {
        self.waiting_since
    }

    /// The shell wrote `n` bytes of [`Output::pending`].
    pub(crate) fn wrote(&mut self, n: usize, now: u64) {
        if n == 0 {
            return;
        }
        self.sent = (self.sent + n).min(self.out.len());
        // Elements written whole are forgotten (keep the start of the one being written).
        while self.starts.len() > 1 && self.starts[1] <= self.sent {
            self.starts.pop_front();
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
            self.starts.clear();
            self.waiting_since = None;
            if self.out.capacity() > 1024 * 1024 {
                self.out = Vec::with_capacity(4096);
            }
        } else {
            self.waiting_since = Some(now);
        }
    }

    /// The shell wrote bytes that carry the output (TLS records not yet complete): progress
    /// for the stall clock, though no byte of the output counts as written yet.
    pub(crate) fn progress(&mut self, now: u64) {
        if self.waiting_since.is_some() {
            self.waiting_since = Some(now);
        }
    }

    /// The elements queued that the server cannot have received whole — those not written
    /// at all, and the one partly written (the server drops an element it did not get to
    /// the end of) — to go out on another stream when this one is lost. Elements written
    /// whole are not among them, even if the server may have missed them: sending them
    /// again could deliver them twice.
    pub(crate) fn take_unsent(&mut self) -> Option<Vec<u8>> {
        let from = self.starts.iter().rev().find(|&&s| s <= self.sent).copied();
        let from = match from {
            Some(s) => s,
            None => *self.starts.front()?,
        };
        let taken = (from < self.out.len()).then(|| self.out[from..].to_vec());
        *self = Output::default();
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_taken_back_is_every_element_the_server_cannot_have_whole() {
        let els: [&[u8]; 3] = [b"<iq id='1'/>", b"<iq id='2'/>", b"<iq id='3'/>"];
        let all: Vec<u8> = els.concat();
        let fill = |o: &mut Output| {
            for e in els {
                o.element(e, 0);
            }
        };
        let mut o = Output::default();
        assert_eq!(o.take_unsent(), None);
        fill(&mut o);
        assert_eq!(o.waiting_since(), Some(0));
        // Nothing written: all three.
        assert_eq!(o.take_unsent().as_deref(), Some(&all[..]));
        // The first written whole: the other two.
        fill(&mut o);
        o.wrote(12, 5);
        assert_eq!(o.waiting_since(), Some(5));
        assert_eq!(o.take_unsent().as_deref(), Some(&all[12..]));
        // The second partly written: it again, whole, and the third.
        fill(&mut o);
        o.wrote(15, 5);
        assert_eq!(o.take_unsent().as_deref(), Some(&all[12..]));
        // Everything written: nothing, and nothing waits.
        fill(&mut o);
        o.wrote(all.len(), 7);
        assert_eq!(o.unsent(), 0);
        assert_eq!(o.waiting_since(), None);
        assert_eq!(o.take_unsent(), None);
        // A header before the elements is never taken back.
        o.raw(b"<stream>", 9);
        o.element(els[0], 9);
        o.wrote(3, 10);
        assert_eq!(o.take_unsent().as_deref(), Some(els[0]));
    }
}
