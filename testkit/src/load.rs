//! What came back for the requests of a load: each answer taken once (an answer that comes
//! twice fails the test), counted as results, errors by condition, or unanswered.

use std::collections::HashMap;
use std::time::Duration;

use crate::client::Element;
use crate::deployment::error_condition;

/// The requests sent (id, when since the load's start) and the answers taken, by id.
#[derive(Default)]
pub struct Tally {
    /// (id, when it was sent since the load's start).
    pub sent: Vec<(String, Duration)>,
    /// The answer to each id.
    pub answers: HashMap<String, Element>,
}

impl Tally {
    /// Takes an answer; panics if its id was answered before.
    pub fn take(&mut self, r: Element) {
        let id = r.attr("id").unwrap_or_default().to_owned();
        if let Some(first) = self.answers.insert(id.clone(), r.clone()) {
            panic!(
                "{id} answered twice:\n{}\n{}",
                crate::client::xml(&first),
                crate::client::xml(&r)
            );
        }
    }

    /// (results, errors by condition, unanswered ids) of the requests sent when `within`
    /// says so.
    pub fn count(
        &self,
        within: impl Fn(Duration) -> bool,
    ) -> (usize, HashMap<String, usize>, Vec<String>) {
        let mut results = 0;
        let mut errors: HashMap<String, usize> = HashMap::new();
        let mut lost = Vec::new();
        for (id, _) in self.sent.iter().filter(|(_, at)| within(*at)) {
            match self.answers.get(id) {
                Some(a) if a.attr("type") == Some("result") => results += 1,
                Some(a) => {
                    *errors
                        .entry(error_condition(a).unwrap_or_else(|| "?".into()))
                        .or_default() += 1
                }
                None => lost.push(id.clone()),
            }
        }
        (results, errors, lost)
    }

    /// [`Tally::count`] over every request sent.
    pub fn all(&self) -> (usize, HashMap<String, usize>, Vec<String>) {
        self.count(|_| true)
    }
}
