//! Following the event stream across api restarts: `flotilla watch`
//! reconnects with backoff when the stream is lost and resumes from the
//! sequence after the last event it showed, so no event is missed and none
//! is shown twice.
//!
//! Design notes: the api's WatchEvents replays from `start_sequence`
//! (inclusive) of the EVT stream, and every event carries its
//! `stream_sequence`; that is all resuming needs. The loop is generic over
//! how a stream is opened so the resume rules are tested without a server.

use std::future::Future;
use std::time::Duration;

use flotilla_proto::v1;
use futures::{Stream, StreamExt};
use tonic::{Code, Status};

/// First wait after a lost stream; doubled per failed attempt.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest wait between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Failures that reconnecting cannot cure: the request or the token is
/// wrong, so the watch stops with that error.
fn is_final(code: Code) -> bool {
    matches!(
        code,
        Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::NotFound
            | Code::Unimplemented
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::AlreadyExists
    )
}

/// Where the next stream starts, and which events were shown already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The sequence to ask for; 0 means new events only (nothing seen yet
    /// and no `--from-sequence`).
    next: u64,
}

impl Resume {
    pub fn from(start_sequence: u64) -> Resume {
        Resume {
            next: start_sequence,
        }
    }

    pub fn start_sequence(&self) -> u64 {
        self.next
    }

    /// Whether the event is new (to be shown); an event before the resume
    /// point is a replayed one already shown.
    pub fn accept(&mut self, stream_sequence: u64) -> bool {
        if stream_sequence == 0 {
            // An api too old to fill the sequence in: show it, resume blind.
            return true;
        }
        if self.next != 0 && stream_sequence < self.next {
            return false;
        }
        self.next = stream_sequence + 1;
        true
    }
}

/// Why a watch stopped (it stops only on a failure reconnecting cannot cure).
#[derive(Debug)]
pub struct Stopped(pub Status);

/// Follows the stream for ever: `open(start_sequence)` opens one, `show`
/// prints an event, `notice` tells the user (stderr) the stream was lost and
/// when the next attempt is.
pub async fn follow<S, O, Fut>(
    start_sequence: u64,
    mut open: O,
    mut show: impl FnMut(&v1::InstanceEvent),
    mut notice: impl FnMut(&str),
) -> Stopped
where
    O: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<S, Status>>,
    S: Stream<Item = Result<v1::InstanceEvent, Status>> + Unpin,
{
    let mut resume = Resume::from(start_sequence);
    let mut backoff = BACKOFF_START;
    let mut lost = false;
    loop {
        let why = match open(resume.start_sequence()).await {
            Err(status) => status,
            Ok(mut stream) => {
                if lost {
                    notice(&format!(
                        "reconnected; resuming from sequence {}",
                        resume.start_sequence()
                    ));
                }
                loop {
                    match stream.next().await {
                        Some(Ok(event)) => {
                            backoff = BACKOFF_START;
                            if resume.accept(event.stream_sequence) {
                                show(&event);
                            }
                        }
                        Some(Err(status)) => break status,
                        None => break Status::unavailable("the api ended the event stream"),
                    }
                }
            }
        };
        if is_final(why.code()) {
            return Stopped(why);
        }
        lost = true;
        let from = match resume.start_sequence() {
            0 => "new events".to_owned(),
            n => format!("sequence {n}"),
        };
        notice(&format!(
            "event stream lost ({:?}: {}); reconnecting in {:.1}s, resuming from {from}",
            why.code(),
            why.message(),
            backoff.as_secs_f64()
        ));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::stream;

    use super::*;

    fn event(seq: u64) -> v1::InstanceEvent {
        v1::InstanceEvent {
            stream_sequence: seq,
            instance_id: format!("i{seq}"),
            ..Default::default()
        }
    }

    #[test]
    fn resume_skips_what_was_shown_and_starts_after_it() {
        let mut r = Resume::from(0);
        assert_eq!(r.start_sequence(), 0);
        assert!(r.accept(5));
        assert_eq!(r.start_sequence(), 6);
        assert!(!r.accept(5), "a replayed event is not shown twice");
        assert!(r.accept(6));
        assert!(r.accept(9), "a filtered watch sees gaps in the sequence");
        assert_eq!(r.start_sequence(), 10);
        let mut r = Resume::from(3);
        assert!(!r.accept(2));
        assert!(r.accept(3));
    }

    /// The api is restarted twice mid-watch: once the stream breaks, once it
    /// ends cleanly (graceful shutdown), and one attempt finds it still down.
    /// Each reopening asks for the sequence after the last event shown, and
    /// replayed events are not shown again.
    #[tokio::test(start_paused = true)]
    async fn a_restarted_api_is_followed_without_gap_or_duplicate() {
        type Items = Vec<Result<v1::InstanceEvent, Status>>;
        let script: Vec<Result<Items, Status>> = vec![
            Ok(vec![
                Ok(event(5)),
                Ok(event(6)),
                Err(Status::unknown("h2 protocol error")),
            ]),
            Err(Status::unavailable("connection refused")),
            Ok(vec![Ok(event(7)), Ok(event(8))]),
            Ok(vec![Ok(event(8)), Ok(event(9))]),
            Err(Status::unauthenticated("token revoked")),
        ];
        let script = Arc::new(Mutex::new(script.into_iter()));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let mut shown = Vec::new();
        let mut notices = Vec::new();
        let started = tokio::time::Instant::now();
        let stopped = follow(
            0,
            |start| {
                asked.lock().expect("asked").push(start);
                let next = script.lock().expect("script").next().expect("script");
                async move { next.map(stream::iter) }
            },
            |e| shown.push(e.stream_sequence),
            |n| notices.push(n.to_owned()),
        )
        .await;
        assert_eq!(stopped.0.code(), Code::Unauthenticated);
        assert_eq!(shown, vec![5, 6, 7, 8, 9], "no gap, no duplicate");
        assert_eq!(*asked.lock().expect("asked"), vec![0, 7, 7, 9, 10]);
        assert!(
            notices[0].contains("resuming from sequence 7"),
            "{notices:?}"
        );
        assert!(
            notices.iter().any(|n| n.starts_with("reconnected")),
            "{notices:?}"
        );
        // Backoff: 250 ms, 500 ms, then reset by events: 250 ms, 250 ms.
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(250 + 500 + 250 + 250)
        );
    }
}
