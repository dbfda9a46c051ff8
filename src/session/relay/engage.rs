//! Transaction mode: when the named-statement layer (`crate::prepared`) must take over.
//!
//! Most clients never name a statement (pgbench `-M extended`, most ORMs' unnamed
//! statements), and for them the layer would only cost: it copies every client frame and
//! inspects every server frame. So a session starts without it, its frames relayed as they
//! are, and engages it at its first frame that needs it (`prepared::engages`).
//!
//! The layer must see a whole request cycle: its answer FIFO cannot adopt messages already
//! at the server. So the relay stops before the cycle that holds the engaging frame, lets
//! everything before it be answered (the `Cycle` is idle again, on the same connection,
//! even inside a transaction), and re-attaches with the layer on. A cycle starts at the
//! first extended-protocol message after a Sync (or at a Query). When the engaging frame
//! belongs to a cycle whose first messages were already forwarded in an earlier batch,
//! stopping would deadlock (the Sync that would end it is held back with it), so the
//! session is pinned instead: on its own connection, raw names are safe.

use crate::prepared;
use crate::protocol::tags;

/// Where a client batch meets the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngagePoint {
    /// Nothing in these bytes needs the layer.
    None,
    /// The bytes from this offset must wait for the layer: forward only what is before.
    At(usize),
    /// An engaging frame inside a cycle already partly at the server: pin the session.
    Pin,
}

/// Scans the complete frames at the front of `buf` (a frame boundary: the relay calls this
/// only with its client scanner at a boundary). `unsynced`: extended-protocol messages
/// were forwarded since the last Sync. `discarding`: the `Cycle` is skipping messages until
/// Sync after a refusal (they never reach the server, so they engage nothing).
pub fn engage_point(buf: &[u8], unsynced: bool, discarding: bool) -> EngagePoint {
    let mut at = 0;
    let mut discarding = discarding;
    // Offset of the first message of the current cycle, `None` when it began before `buf`.
    let mut cycle_start = if unsynced || discarding {
        None
    } else {
        Some(0)
    };
    let mut in_cycle = unsynced || discarding;
    while let Some(header) = buf.get(at..at + 5) {
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let Some(body) = len.checked_sub(4).and_then(|n| buf.get(at + 5..at + 5 + n)) else {
            // Incomplete (or malformed: the `Cycle` reports that): decided when whole.
            break;
        };
        let start = at;
        at += 1 + len;
        if discarding {
            if tag == tags::SYNC {
                discarding = false;
                in_cycle = false;
                cycle_start = Some(at);
            }
            continue;
        }
        if !in_cycle {
            cycle_start = Some(start);
        }
        if prepared::engages(tag, body) {
            return match cycle_start {
                Some(s) => EngagePoint::At(s),
                None => EngagePoint::Pin,
            };
        }
        match tag {
            tags::SYNC | tags::QUERY | tags::FUNCTION_CALL => {
                in_cycle = false;
                cycle_start = Some(at);
            }
            _ => in_cycle = true,
        }
    }
    EngagePoint::None
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::frame::test_frame as frame;

    fn parse(name: &str) -> Vec<u8> {
        frame(b'P', format!("{name}\0SELECT 1\0\0\0").as_bytes())
    }
    fn bind(stmt: &str) -> Vec<u8> {
        frame(b'B', format!("\0{stmt}\0\0\0\0\0\0\0").as_bytes())
    }
    fn execute() -> Vec<u8> {
        frame(b'E', b"\0\0\0\0\0")
    }
    fn sync() -> Vec<u8> {
        frame(b'S', b"")
    }
    fn query(sql: &str) -> Vec<u8> {
        frame(b'Q', format!("{sql}\0").as_bytes())
    }

    fn batch(frames: &[Vec<u8>]) -> Vec<u8> {
        frames.concat()
    }

    #[test]
    fn unnamed_traffic_never_engages() {
        let b = batch(&[
            parse(""),
            bind(""),
            execute(),
            sync(),
            query("SELECT 1"),
            frame(b'D', b"P\0"),
            frame(b'C', b"P\0"),
            frame(b'D', b"S\0"),
        ]);
        assert_eq!(engage_point(&b, false, false), EngagePoint::None);
    }

    #[test]
    fn stops_at_the_start_of_the_cycle_that_names_a_statement() {
        let first = batch(&[parse(""), bind(""), execute(), sync()]);
        let b = batch(&[
            first.clone(),
            parse(""),
            bind(""),
            execute(),
            parse("s1"),
            sync(),
        ]);
        assert_eq!(engage_point(&b, false, false), EngagePoint::At(first.len()));
        assert_eq!(
            engage_point(&batch(&[bind("s1"), execute(), sync()]), false, false),
            EngagePoint::At(0)
        );
        let q = query("select 1");
        let b = batch(&[q.clone(), query("DEALLOCATE ALL")]);
        assert_eq!(engage_point(&b, false, false), EngagePoint::At(q.len()));
        assert_eq!(
            engage_point(&query("discard all"), false, false),
            EngagePoint::At(0)
        );
        assert_eq!(
            engage_point(&frame(b'C', b"Ss1\0"), false, false),
            EngagePoint::At(0)
        );
    }

    #[test]
    fn a_cycle_begun_in_an_earlier_batch_pins() {
        let b = batch(&[bind(""), parse("s1"), sync()]);
        assert_eq!(engage_point(&b, true, false), EngagePoint::Pin);
        // After its Sync a new cycle starts here.
        let b = batch(&[sync(), parse("s1"), sync()]);
        assert_eq!(engage_point(&b, true, false), EngagePoint::At(5));
    }

    #[test]
    fn discarded_messages_engage_nothing() {
        let b = batch(&[parse("s1"), bind("s1"), sync()]);
        assert_eq!(engage_point(&b, false, true), EngagePoint::None);
        let b = batch(&[parse("s1"), sync(), parse("s2"), sync()]);
        let at = parse("s1").len() + 5;
        assert_eq!(engage_point(&b, false, true), EngagePoint::At(at));
    }

    #[test]
    fn incomplete_frames_wait() {
        let p = parse("s1");
        assert_eq!(
            engage_point(&p[..p.len() - 1], false, false),
            EngagePoint::None
        );
        assert_eq!(engage_point(&p[..3], false, false), EngagePoint::None);
    }
}
