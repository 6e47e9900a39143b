//! The endpoint's side of an in-place upgrade: idle, the new binary checking the
//! configuration, the wait (at most [`HANDOVER_WAIT_MS`]) for every stream to be at a point it
//! can be handed over at, and the handover itself (the record; the shell `exec`s). Also the
//! other end: going on with the streams the previous process handed over.

use tracing::{info, warn};

use super::link::{DRAIN_LIMIT_MS, FOOTER_WAIT_MS, History, Open, Phase, State, Up};
use super::{Clock, Endpoint, Event, LinkId, Notify};
use crate::stream::{ReadError, Reader, Writer};
use crate::upgrade::{Record, StreamRecord, format_for};

/// How long an upgrade waits for the streams to reach a point they can be handed over at
/// (an element over the byte limit being dropped as it streams in, or output a server has not
/// taken, holds one up; requests held for a resource do not).
pub(crate) const HANDOVER_WAIT_MS: u64 = 5_000;

/// Where the upgrade is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Upgrade {
    Idle,
    /// The new binary checks the configuration.
    Checking,
    /// Waiting, since `since`, for a handover point; the new binary reads these record
    /// formats.
    Waiting {
        since: u64,
        reads: Vec<u16>,
        /// How long it may wait: [`HANDOVER_WAIT_MS`], and with TLS streams to close first,
        /// the longest their close may take.
        limit: u64,
    },
    /// Handed over: the shell `exec`s.
    Exec,
}

impl Upgrade {
    pub(crate) fn timeout(&self) -> Option<u64> {
        match self {
            Upgrade::Waiting { since, limit, .. } => Some(since + limit),
            _ => None,
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        *self == Upgrade::Idle
    }
}

/// What to `exec` the new binary with.
#[derive(Debug)]
pub struct HandOver {
    /// The links whose sockets go over, in the record's order.
    pub links: Vec<LinkId>,
    /// The record's format and bytes (none without streams).
    pub record: Option<(u16, Vec<u8>)>,
}

impl Endpoint {
    pub(super) fn upgrade_signal(&mut self) {
        if !self.upgrade.is_idle() {
            info!("SIGUSR2: an upgrade is already under way");
            return;
        }
        info!(binary = %self.settings.binary, "SIGUSR2: upgrading in place");
        self.events.push_back(Event::Notify(Notify::Reloading(
            "upgrading: checking the new binary".into(),
        )));
        self.upgrade = Upgrade::Checking;
        self.events.push_back(Event::CheckUpgrade);
    }

    /// The new binary's check is done: the record formats it reads, or why the upgrade is
    /// refused.
    pub fn upgrade_checked(&mut self, result: Result<Vec<u16>, String>, now: Clock) {
        self.now = now;
        if self.upgrade != Upgrade::Checking {
            return;
        }
        let streams = self.plain_ups();
        let accepted = result.and_then(|reads| {
            if streams > 0 && format_for(streams, &reads).is_none() {
                Err(self.cannot_take(&reads, streams))
            } else {
                Ok(reads)
            }
        });
        match accepted {
            Ok(reads) => {
                let tls = self.links.iter().any(|l| l.tls.is_some());
                self.upgrade = Upgrade::Waiting {
                    since: now.mono_ms,
                    reads,
                    limit: HANDOVER_WAIT_MS
                        + if tls {
                            DRAIN_LIMIT_MS + self.close_write_limit() + FOOTER_WAIT_MS
                        } else {
                            0
                        },
                }
            }
            Err(why) => {
                warn!("upgrade refused: {why}; still serving");
                self.upgrade_over();
            }
        }
        self.after();
    }

    /// The `exec` of an [`Event::HandOver`] did not happen (the shell logged why): this
    /// process serves on.
    pub fn upgrade_failed(&mut self, now: Clock) {
        self.now = now;
        if self.upgrade == Upgrade::Exec {
            self.upgrade_over();
        }
        self.after();
    }

    /// An upgrade did not happen: the service manager hears that this process serves on (at
    /// once while no stream is up; with the status line once one is).
    fn upgrade_over(&mut self) {
        self.upgrade = Upgrade::Idle;
        self.ready_sent = false;
        self.revive();
        if self.ups() == 0 {
            self.events
                .push_back(Event::Notify(Notify::Ready("not connected".into())));
        }
    }

    /// Streams up without TLS (those an upgrade hands over).
    fn plain_ups(&self) -> usize {
        self.links
            .iter()
            .filter(|l| l.tls.is_none() && l.is_up())
            .count()
    }

    /// TLS state cannot cross `exec` (rustls cannot take it back): while an upgrade waits
    /// for its handover point, each TLS stream is drained and closed as at shutdown (what
    /// the socket holds is answered, then footers), and no TLS login is begun; the new
    /// process logs in to those servers anew. Whether a TLS stream is still open.
    fn retire_tls(&mut self) -> bool {
        let t = self.now.mono_ms;
        let mut open = false;
        for i in 0..self.links.len() {
            let l = &mut self.links[i];
            if l.tls.is_none() {
                continue;
            }
            match &mut l.state {
                State::Open(o) => match &o.phase {
                    Phase::Up(up) => {
                        info!(
                            server = %l.server,
                            "upgrade: closing the TLS stream (TLS cannot be handed over); the new process logs in anew"
                        );
                        o.phase = Phase::Draining {
                            history: up.history,
                            until: t + DRAIN_LIMIT_MS,
                            drained: 0,
                            done: false,
                        };
                        self.events.push_back(Event::Drain { link: i });
                        open = true;
                    }
                    Phase::Login { .. } => self.close_link(i),
                    Phase::Draining { .. } | Phase::Closing { .. } | Phase::Footer { .. } => {
                        open = true
                    }
                },
                State::Connecting { .. } => self.close_link(i),
                State::Down { .. } => l.state = State::Stopped,
                State::Stopped => {}
            }
        }
        open
    }

    /// An upgrade did not happen: the TLS streams it closed log in again at once (and if
    /// none is up now, the session is down).
    fn revive(&mut self) {
        if self.stopping != super::Stopping::No {
            return;
        }
        let now = self.now.mono_ms;
        for l in &mut self.links {
            if matches!(l.state, State::Stopped) {
                l.state = State::Down { retry_at: now };
            }
        }
        if self.up && self.ups() == 0 {
            self.up = false;
            self.proxy.disconnected();
            self.events.push_back(Event::SessionDown);
            self.resources_reported = None;
        }
    }

    fn cannot_take(&self, reads: &[u16], streams: usize) -> String {
        format!(
            "{} reads handover formats {reads:?}, none of which this build writes for {streams} \
             stream(s) (1 for one stream, 2 for any number): restart the service to run it",
            self.settings.binary
        )
    }

    pub(super) fn upgrade_timeout(&mut self) {
        if self
            .upgrade
            .timeout()
            .is_some_and(|t| t <= self.now.mono_ms)
        {
            let limit = match &self.upgrade {
                Upgrade::Waiting { limit, .. } => *limit,
                _ => HANDOVER_WAIT_MS,
            };
            warn!(
                "upgrade abandoned: the streams were never at a point they could be handed over at (a stanza over the limit streaming in, output the server did not take, or a TLS stream not closed) within {limit} ms; still serving"
            );
            self.upgrade_over();
        }
    }

    /// Every stream up, with the bytes of its element not yet complete, if all of them are
    /// at a point where they can be handed over. Requests held for a resource do not hold
    /// the upgrade up: they are handed over as XML for the new process to read first.
    fn handover_point(&self) -> Option<Vec<(LinkId, Vec<u8>)>> {
        self.links
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_up())
            .map(|(i, l)| {
                let o = l.open()?;
                o.reader
                    .pending()
                    .filter(|_| o.unsent() == 0)
                    .map(|p| (i, p))
            })
            .collect()
    }

    /// While waiting for a handover point: if the streams are at one, the handover.
    pub(super) fn upgrade_point(&mut self) {
        let Upgrade::Waiting { reads, .. } = &self.upgrade else {
            return;
        };
        let reads = reads.clone();
        if self.retire_tls() {
            return;
        }
        let Some(mut pending) = self.handover_point() else {
            return;
        };
        // Held requests go first on the first stream: the new process reads them as it
        // reads what the server sent, and holds them again (the hold time starts anew).
        if let Some((_, first)) = pending.first_mut()
            && self.proxy.held() > 0
        {
            let mut held: Vec<u8> = self.proxy.held_xml().flat_map(str::bytes).collect();
            held.append(first);
            *first = held;
        }
        if pending.is_empty() {
            self.upgrade = Upgrade::Exec;
            self.events.push_back(Event::HandOver(HandOver {
                links: Vec::new(),
                record: None,
            }));
            return;
        }
        let mut streams = Vec::with_capacity(pending.len());
        for (i, p) in &pending {
            let l = &self.links[*i];
            let (Some(o), Some(h)) = (l.open(), l.history()) else {
                continue;
            };
            let Some(header) = o.reader.header_bytes() else {
                warn!(server = %l.server, "upgrade failed: the stream's header is not known; still serving");
                return self.upgrade_over();
            };
            streams.push(StreamRecord {
                server: l.server.clone(),
                header: header.to_vec(),
                pending: p.clone(),
                established_unix_ms: h.established_ms,
                upgrades: h.upgrades + 1,
            });
        }
        let record = Record {
            component: self.settings.jid.clone(),
            streams,
            resources: self
                .proxy
                .resources()
                .eligible_names()
                .map(str::to_owned)
                .collect(),
            build: self.settings.build.get().to_owned(),
        };
        // The streams up now may not be those up when the binary was checked.
        let Some((format, bytes)) = format_for(record.streams.len(), &reads)
            .and_then(|format| Some((format, record.encode_as(format)?)))
        else {
            let why = self.cannot_take(&reads, record.streams.len());
            warn!("upgrade refused: {why}; still serving");
            return self.upgrade_over();
        };
        info!(
            binary = %self.settings.binary,
            streams = record.streams.len(),
            format,
            pending_bytes = record.streams.iter().map(|s| s.pending.len()).sum::<usize>(),
            resources = record.resources.len(),
            "handing the stream over to the new binary"
        );
        self.upgrade = Upgrade::Exec;
        self.events.push_back(Event::HandOver(HandOver {
            links: pending.into_iter().map(|(i, _)| i).collect(),
            record: Some((format, bytes)),
        }));
    }

    /// A stream the previous process handed over, to `server` (as configured), whose
    /// server's header was `header` and of which `pending` was received after the last
    /// complete element: the link it is now (serving at once; give its socket to that link),
    /// `Ok(None)` if no link is to that server.
    pub fn resume(
        &mut self,
        server: &str,
        header: &[u8],
        pending: &[u8],
        history: History,
        now: Clock,
    ) -> Result<Option<LinkId>, ReadError> {
        self.now = now;
        let Some(i) = self
            .links
            .iter()
            .position(|l| l.server == server && l.tls.is_none())
        else {
            return Ok(None);
        };
        let mut reader = Reader::resume(self.settings.limits, header)?;
        reader.feed(pending)?;
        self.links[i].state = State::Open(Box::new(Open {
            reader,
            writer: Writer::resumed(),
            output: Default::default(),
            phase: Phase::Up(Up {
                history,
                last_read: now.mono_ms,
                ping_sent: None,
            }),
            tls: None,
            heard: true,
        }));
        Ok(Some(i))
    }

    /// Every stream handed over was given to [`Endpoint::resume`]: they are served, with the
    /// resources known then.
    pub fn resumed(&mut self, resources: &[String], now: Clock) {
        self.now = now;
        if let Some(first) = self.out_link() {
            let probe = self.proxy.resumed(resources);
            for el in &probe {
                self.queue(first, el);
            }
            if let Some(h) = self.links[first].history() {
                self.session_up(h);
            }
        }
        for i in 0..self.links.len() {
            if self.links[i].is_up() {
                self.frames(i);
            }
        }
        self.after();
    }
}
