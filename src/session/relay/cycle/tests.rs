use super::*;

use crate::protocol::frame::test_frame as frame;

fn query(sql: &str) -> Vec<u8> {
    let mut b = sql.as_bytes().to_vec();
    b.push(0);
    frame(tags::QUERY, &b)
}

fn parse(sql: &str) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(sql.as_bytes());
    b.extend_from_slice(&[0, 0, 0]);
    frame(tags::PARSE, &b)
}

struct NoEvil;
impl ClientFilter for NoEvil {
    fn check_sql(&self, sql: &str) -> Option<Refusal> {
        sql.contains("evil").then(|| Refusal {
            code: "42501",
            message: "blocked".into(),
        })
    }
    fn check_function_call(&self) -> Option<Refusal> {
        Some(Refusal {
            code: "0A000",
            message: "no".into(),
        })
    }
}

fn plan(cycle: &mut Cycle, bytes: &[u8]) -> ClientPlan {
    let mut scan = FrameScanner::new(1 << 20);
    cycle.plan_client(&mut scan, bytes, Some(&NoEvil)).unwrap()
}

fn forwarded(p: &ClientPlan, bytes: &[u8]) -> Vec<u8> {
    p.forwarded().flat_map(|r| bytes[r].to_vec()).collect()
}

fn locals(cycle: &mut Cycle) -> Vec<u8> {
    let mut out = BytesMut::new();
    cycle.take_due_locals(b'I', &mut out);
    out.to_vec()
}

#[test]
fn allowed_query_is_forwarded_and_awaits_ready() {
    let mut c = Cycle::default();
    let q = query("SELECT 1");
    let p = plan(&mut c, &q);
    assert_eq!(forwarded(&p, &q), q);
    assert_eq!(p.queries, 1);
    assert!(!c.idle());
    assert!(locals(&mut c).is_empty());
    assert_eq!(c.on_server_ready(Instant::now()), None);
    assert!(c.idle());
}

#[test]
fn refused_query_is_answered_locally_and_the_session_goes_on() {
    let mut c = Cycle::default();
    let q = query("SELECT evil()");
    let p = plan(&mut c, &q);
    assert!(forwarded(&p, &q).is_empty());
    let out = locals(&mut c);
    assert_eq!(out[0], tags::ERROR_RESPONSE);
    assert_eq!(&out[out.len() - 6..], &[b'Z', 0, 0, 0, 5, b'I']);
    assert!(c.idle());
}

#[test]
fn refusal_waits_for_earlier_answers_in_a_pipeline() {
    let mut c = Cycle::default();
    let mut bytes = query("SELECT 1");
    let evil = query("SELECT evil()");
    bytes.extend(&evil);
    bytes.extend(query("SELECT 3"));
    let p = plan(&mut c, &bytes);
    let mut expected = query("SELECT 1");
    expected.extend(query("SELECT 3"));
    assert_eq!(forwarded(&p, &bytes), expected);
    assert_eq!(p.queries, 3);
    // Not yet: the server has not answered SELECT 1.
    assert!(locals(&mut c).is_empty());
    assert_eq!(c.on_server_ready(Instant::now()), None);
    assert_eq!(locals(&mut c)[0], tags::ERROR_RESPONSE);
    assert!(!c.idle(), "SELECT 3 still in flight");
    assert_eq!(c.on_server_ready(Instant::now()), None);
    assert!(c.idle());
}

#[test]
fn refused_parse_skips_to_sync_and_answers_once() {
    let mut c = Cycle::default();
    let mut bytes = parse("SELECT evil()");
    bytes.extend(frame(tags::BIND, &[0, 0, 0, 0, 0, 0, 0, 0]));
    bytes.extend(frame(tags::EXECUTE, &[0, 0, 0, 0, 0]));
    bytes.extend(frame(tags::SYNC, &[]));
    let p = plan(&mut c, &bytes);
    assert!(forwarded(&p, &bytes).is_empty());
    assert_eq!(locals(&mut c)[0], tags::ERROR_RESPONSE);
    assert!(c.idle());
}

#[test]
fn refused_parse_after_forwarded_messages_errors_before_the_servers_ready() {
    let mut c = Cycle::default();
    let ok = parse("SELECT 1");
    let mut bytes = ok.clone();
    bytes.extend(parse("SELECT evil()"));
    let sync = frame(tags::SYNC, &[]);
    bytes.extend(&sync);
    let p = plan(&mut c, &bytes);
    let mut expected = ok;
    expected.extend(&sync);
    assert_eq!(forwarded(&p, &bytes), expected);
    assert!(locals(&mut c).is_empty());
    let before_ready = c
        .on_server_ready(Instant::now())
        .expect("error goes before the server's ReadyForQuery");
    assert_eq!(before_ready[0], tags::ERROR_RESPONSE);
    assert!(c.idle());
}

#[test]
fn discarding_spans_reads() {
    let mut c = Cycle::default();
    let first = parse("SELECT evil()");
    let p = plan(&mut c, &first);
    assert!(forwarded(&p, &first).is_empty());
    assert!(!c.idle());
    let mut second = frame(tags::BIND, &[0, 0, 0, 0, 0, 0, 0, 0]);
    second.extend(frame(tags::SYNC, &[]));
    second.extend(query("SELECT 2"));
    let p = plan(&mut c, &second);
    assert_eq!(forwarded(&p, &second), query("SELECT 2"));
    assert_eq!(locals(&mut c)[0], tags::ERROR_RESPONSE);
    assert_eq!(c.on_server_ready(Instant::now()), None);
    assert!(c.idle());
}

#[test]
fn function_call_can_be_refused() {
    let mut c = Cycle::default();
    let f = frame(tags::FUNCTION_CALL, &[0, 0, 7, 234, 0, 0, 0, 0, 0, 0]);
    let p = plan(&mut c, &f);
    assert!(forwarded(&p, &f).is_empty());
    let out = locals(&mut c);
    assert!(String::from_utf8_lossy(&out).contains("0A000"));
}

#[test]
fn terminate_ends_the_plan_and_is_not_forwarded() {
    let mut c = Cycle::default();
    let mut bytes = query("SELECT 1");
    let at = bytes.len();
    bytes.extend(frame(tags::TERMINATE, &[]));
    bytes.extend(query("SELECT 2"));
    let p = plan(&mut c, &bytes);
    assert!(p.terminate);
    assert_eq!(p.consumed, at);
    assert_eq!(forwarded(&p, &bytes), query("SELECT 1"));
}

#[test]
fn without_a_filter_nothing_is_inspected() {
    let mut c = Cycle::default();
    let q = query("SELECT evil()");
    let mut scan = FrameScanner::new(1 << 20);
    // Half a frame: streamed through, no refusal possible.
    let p = c.plan_client(&mut scan, &q[..8], None).unwrap();
    assert_eq!(p.consumed, 8);
    assert!(p.dropped.is_empty());
    assert_eq!(p.queries, 1);
}
