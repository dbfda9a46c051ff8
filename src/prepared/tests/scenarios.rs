//! One scenario per rule: what the server receives and what the client sees.

use super::*;

const Q1: &str = "select 1";
const Q2: &str = "select 2";

/// Client `ps` prepares `name` as `sql` on `conn` (one Parse + Sync cycle).
fn prepare(ps: &mut PreparedStatements, conn: &mut Conn, name: &str, sql: &str) -> Vec<String> {
    let (_, saw) = round_trip(
        ps,
        conn,
        &batch(|b| {
            parse(b, name, sql);
            sync(b);
        }),
    );
    seen(&saw)
}

fn run(ps: &mut PreparedStatements, conn: &mut Conn, b: &[u8]) -> (Vec<String>, Vec<String>) {
    let (to_server, to_client) = round_trip(ps, conn, b);
    assert!(ps.idle(), "answers left over");
    (sent(&to_server), seen(&to_client))
}

fn bind_execute(name: &str) -> BytesMut {
    batch(|b| {
        bind(b, "", name, "x");
        execute(b, "");
        sync(b);
    })
}

#[test]
fn named_statement_is_renamed_in_parse_and_bind() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let (to_server, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "s1", Q1);
            bind(b, "", "s1", "x");
            execute(b, "");
            sync(b);
        }),
    );
    let n = name_of(Q1);
    assert_eq!(
        to_server,
        [
            format!("P {n}|{Q1}"),
            format!("B |{n}"),
            "E".into(),
            "S".into()
        ]
    );
    assert_eq!(saw, ["1", "2", "D", "C", "Z"]);
    assert!(ps.client().get(b"s1").is_some());
    assert_eq!(a.statements.len(), 1);
}

#[test]
fn bind_body_after_the_name_is_copied_byte_for_byte() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    let client = batch(|b| bind(b, "p", "s1", "param value"));
    let mut out = BytesMut::new();
    ps.rewrite(&client, &mut a.statements, &mut out).unwrap();
    let (_, client_body) = &frames(&client)[0];
    let (_, server_body) = &frames(&out)[0];
    let tail = |body: &[u8]| body[body.iter().position(|b| *b == 0).unwrap() + 1..].to_vec();
    let after = |body: &[u8]| {
        let t = tail(body);
        t[t.iter().position(|b| *b == 0).unwrap() + 1..].to_vec()
    };
    assert_eq!(after(client_body), after(server_body));
    assert_eq!(cstrs(server_body)[1], name_of(Q1));
}

#[test]
fn frames_needing_no_change_pass_unchanged() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let client = batch(|b| {
        parse(b, "", Q1);
        bind(b, "", "", "x");
        describe(b, b'P', "");
        execute(b, "");
        close(b, b'P', "");
        frontend::flush(b);
        sync(b);
        query(b, "select 3");
    });
    let mut out = BytesMut::new();
    ps.rewrite(&client, &mut a.statements, &mut out).unwrap();
    assert_eq!(&out[..], &client[..]);
    assert!(a.statements.is_empty());
}

#[test]
fn known_statement_is_not_parsed_twice_and_parse_complete_keeps_its_place() {
    let mut a = conn(10);
    let mut first = PreparedStatements::new(&cfg(10, 10));
    prepare(&mut first, &mut a, "s1", Q1);
    // Another client of the tenant prepares the same text: the connection has it.
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    prepare(&mut ps, &mut a, "a", Q2);
    let (to_server, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            bind(b, "", "a", "x");
            execute(b, "");
            parse(b, "b", Q1);
            bind(b, "", "b", "y");
            execute(b, "");
            sync(b);
        }),
    );
    let (n1, n2) = (name_of(Q1), name_of(Q2));
    assert_eq!(
        to_server,
        [
            format!("B |{n2}"),
            "E".into(),
            format!("B |{n1}"),
            "E".into(),
            "S".into()
        ]
    );
    // The synthesized ParseComplete sits between the first Execute's and the second Bind's.
    assert_eq!(saw, ["2", "D", "C", "1", "2", "D", "C", "Z"]);
    assert_eq!(ps.take_counters().hits, 1);
}

#[test]
fn missing_statement_is_parsed_again_on_another_connection() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let (mut a, mut b) = (conn(10), conn(10));
    prepare(&mut ps, &mut a, "s1", Q1);
    let (to_server, saw) = run(&mut ps, &mut b, &bind_execute("s1"));
    let n = name_of(Q1);
    assert_eq!(
        to_server,
        [
            format!("P {n}|{Q1}"),
            format!("B |{n}"),
            "E".into(),
            "S".into()
        ]
    );
    assert_eq!(saw, ["2", "D", "C", "Z"]);
    assert_eq!(ps.take_counters().reparsed, 1);
    // Next time the connection has it.
    let (to_server, _) = run(&mut ps, &mut b, &bind_execute("s1"));
    assert_eq!(to_server, [format!("B |{n}"), "E".into(), "S".into()]);
}

#[test]
fn describe_statement_is_renamed_and_its_answer_relayed() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let (mut a, mut b) = (conn(10), conn(10));
    prepare(&mut ps, &mut a, "s1", Q1);
    let (to_server, saw) = run(
        &mut ps,
        &mut b,
        &batch(|m| {
            describe(m, b'S', "s1");
            sync(m);
        }),
    );
    let n = name_of(Q1);
    assert_eq!(
        to_server,
        [format!("P {n}|{Q1}"), format!("D S {n}"), "S".into()]
    );
    assert_eq!(saw, ["t", "T", "Z"]);
}

#[test]
fn parse_and_flush_is_answered_at_once() {
    let mut a = conn(10);
    let mut other = PreparedStatements::new(&cfg(10, 10));
    prepare(&mut other, &mut a, "x", Q1);
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut out = BytesMut::new();
    let client = batch(|b| {
        parse(b, "s1", Q1);
        frontend::flush(b);
    });
    ps.rewrite(&client, &mut a.statements, &mut out).unwrap();
    assert_eq!(sent(&out), ["H"]);
    let mut to_client = BytesMut::new();
    ps.drain_due(&mut to_client);
    assert_eq!(seen(&to_client), ["1"]);
    assert!(ps.idle());
}

#[test]
fn close_is_answered_locally_and_the_server_copy_stays() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    let (to_server, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            close(b, b'S', "s1");
            close(b, b'S', "never");
            sync(b);
        }),
    );
    assert_eq!(to_server, ["S"]);
    assert_eq!(saw, ["3", "3", "Z"]);
    assert!(ps.client().get(b"s1").is_none());
    assert_eq!(a.statements.len(), 1);
    // Using it now fails as in PostgreSQL, and the batch is skipped to Sync.
    let (to_server, saw) = run(&mut ps, &mut a, &bind_execute("s1"));
    assert_eq!(to_server, ["D S pgt_none", "E", "S"]);
    assert_eq!(saw, ["E:26000", "Z"]);
    // The name is free again.
    assert_eq!(prepare(&mut ps, &mut a, "s1", Q2), ["1", "Z"]);
}

#[test]
fn refused_error_names_the_client_statement() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let (_, to_client) = round_trip(&mut ps, &mut a, &bind_execute("Mine"));
    let (tag, body) = &frames(&to_client)[0];
    assert_eq!(*tag, b'E');
    assert_eq!(
        error_field(body, b'M'),
        Some("prepared statement \"Mine\" does not exist")
    );
    assert_eq!(error_field(body, b'S'), Some("ERROR"));
}

#[test]
fn duplicate_parse_fails_with_42p05_and_keeps_the_first() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    let (_, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "s1", Q2);
            bind(b, "", "s1", "x");
            execute(b, "");
            sync(b);
        }),
    );
    assert_eq!(saw, ["E:42P05", "Z"]);
    assert_eq!(&*ps.client().get(b"s1").unwrap().query, Q1.as_bytes());
}

#[test]
fn deallocate_runs_on_the_server_name() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let (mut a, mut b) = (conn(10), conn(10));
    prepare(&mut ps, &mut a, "s1", Q1);
    prepare(&mut ps, &mut a, "s2", Q2);
    let n1 = name_of(Q1);
    let (to_server, saw) = run(&mut ps, &mut a, &batch(|m| query(m, "DEALLOCATE S1;")));
    assert_eq!(to_server, [format!("Q DEALLOCATE {n1}")]);
    assert_eq!(saw, ["C", "Z"]);
    assert!(ps.client().get(b"s1").is_none());
    assert_eq!(a.statements.len(), 1);
    // On a connection without it: prepared in a hidden cycle first, answers swallowed.
    let n2 = name_of(Q2);
    let (to_server, saw) = run(
        &mut ps,
        &mut b,
        &batch(|m| query(m, "deallocate prepare s2")),
    );
    assert_eq!(
        to_server,
        [
            format!("P {n2}|{Q2}"),
            "S".into(),
            format!("Q DEALLOCATE {n2}")
        ]
    );
    assert_eq!(saw, ["C", "Z"]);
    assert!(ps.client().is_empty() && b.statements.is_empty());
    // Unknown to pgtenant: the server answers.
    let (to_server, saw) = run(&mut ps, &mut a, &batch(|m| query(m, "DEALLOCATE nope")));
    assert_eq!(to_server, ["Q DEALLOCATE nope"]);
    assert_eq!(saw, ["E:26000", "Z"]);
}

#[test]
fn deallocate_all_and_discard_all_forget_everything() {
    for sql in ["DEALLOCATE ALL", "discard all"] {
        let mut ps = PreparedStatements::new(&cfg(10, 10));
        let mut a = conn(10);
        prepare(&mut ps, &mut a, "s1", Q1);
        let (to_server, saw) = run(&mut ps, &mut a, &batch(|m| query(m, sql)));
        assert_eq!(to_server, [format!("Q {sql}")]);
        assert_eq!(saw, ["C", "Z"]);
        assert!(ps.client().is_empty() && a.statements.is_empty());
        assert_eq!(prepare(&mut ps, &mut a, "s1", Q1), ["1", "Z"]);
    }
}

#[test]
fn failed_deallocate_is_rolled_back() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    let mut to_server = BytesMut::new();
    ps.rewrite(
        &batch(|m| query(m, "DEALLOCATE ALL")),
        &mut a.statements,
        &mut to_server,
    )
    .unwrap();
    assert!(ps.client().is_empty());
    // The server refuses it (say, a failed transaction).
    let mut answers = BytesMut::new();
    Backend::error(&mut answers, "25P02");
    messages::ready_for_query(&mut answers, b'E');
    let mut to_client = BytesMut::new();
    relay_answers(&mut ps, &mut a.statements, &answers, &mut to_client);
    assert_eq!(seen(&to_client), ["E:25P02", "Z"]);
    assert!(ps.client().get(b"s1").is_some());
    assert_eq!(a.statements.len(), 1);
}

#[test]
fn eviction_closes_the_least_recently_used_and_swallows_close_complete() {
    let mut ps = PreparedStatements::new(&cfg(10, 2));
    let mut a = Conn {
        statements: ServerStatements::new(2),
        backend: Backend::default(),
    };
    prepare(&mut ps, &mut a, "s1", Q1);
    prepare(&mut ps, &mut a, "s2", Q2);
    run(&mut ps, &mut a, &bind_execute("s1")); // s2 is now the least recently used
    let (to_server, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "s3", "select 3");
            sync(b);
        }),
    );
    let n2 = name_of(Q2);
    assert_eq!(
        to_server,
        [
            format!("C S {n2}"),
            format!("P {}|select 3", name_of("select 3")),
            "S".into()
        ]
    );
    assert_eq!(saw, ["1", "Z"]);
    assert_eq!(a.statements.len(), 2);
    assert!(!a.backend.statements.contains_key(&n2));
    assert_eq!(ps.take_counters().evicted, 1);
    // s2 comes back transparently (evicting s1, the least recently used now).
    let (to_server, saw) = run(&mut ps, &mut a, &bind_execute("s2"));
    assert_eq!(to_server.len(), 5, "{to_server:?}");
    assert_eq!(saw, ["2", "D", "C", "Z"]);
}

#[test]
fn statements_bound_in_the_open_transaction_are_not_evicted() {
    let mut server = ServerStatements::new(2);
    let (d1, d2) = (
        StatementDef::new(b"a", &[0, 0]),
        StatementDef::new(b"b", &[0, 0]),
    );
    let (n1, _) = server.resolve(&d1);
    server.insert(n1, d1);
    let (n2, _) = server.resolve(&d2);
    server.insert(n2, d2);
    server.protect(n1);
    server.protect(n2);
    assert!(
        server.evict_for_insert(|_| false).is_none(),
        "all in use: exceed the bound"
    );
    server.on_idle();
    assert_eq!(server.evict_for_insert(|_| false).map(|(n, _)| n), Some(n1));
}

#[test]
fn hash_collision_gets_a_probed_name() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let real = StatementDef::new(Q1.as_bytes(), &[0, 0]);
    // Another statement whose hash equals Q1's holds the plain name on this connection.
    let forged = std::sync::Arc::new(StatementDef {
        query: b"select 'other'".to_vec().into(),
        param_types: vec![0, 0].into(),
        hash: real.hash,
    });
    a.statements.insert(
        ServerName {
            hash: real.hash,
            probe: 0,
        },
        forged,
    );
    let (to_server, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "s1", Q1);
            bind(b, "", "s1", "x");
            sync(b);
        }),
    );
    let probed = format!("{}_1", name_of(Q1));
    assert_eq!(
        to_server,
        [
            format!("P {probed}|{Q1}"),
            format!("B |{probed}"),
            "S".into()
        ]
    );
    assert_eq!(saw, ["1", "2", "Z"]);
    assert_eq!(
        a.statements.resolve(&real),
        (
            ServerName {
                hash: real.hash,
                probe: 1
            },
            true
        )
    );
}

#[test]
fn failed_parse_leaves_no_trace() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let (_, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "s1", "select bad");
            bind(b, "", "s1", "x");
            execute(b, "");
            sync(b);
        }),
    );
    assert_eq!(saw, ["E:42601", "Z"]);
    assert!(ps.client().is_empty() && a.statements.is_empty());
    assert_eq!(prepare(&mut ps, &mut a, "s1", Q1), ["1", "Z"]);
}

#[test]
fn failed_injected_parse_reports_the_error_and_is_forgotten() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let (mut a, mut b) = (conn(10), conn(10));
    prepare(&mut ps, &mut a, "s1", Q1);
    // On b the statement no longer parses (say, its table was dropped).
    b.backend.max_named = Some(0);
    let (to_server, saw) = run(&mut ps, &mut b, &bind_execute("s1"));
    assert_eq!(to_server.len(), 4);
    assert_eq!(saw, ["E:53400", "Z"]);
    assert!(b.statements.is_empty());
    assert!(ps.client().get(b"s1").is_some());
}

#[test]
fn answers_skipped_after_an_error_are_not_synthesized_and_rolled_back() {
    let mut a = conn(10);
    let mut other = PreparedStatements::new(&cfg(10, 10));
    prepare(&mut other, &mut a, "x", Q2);
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    prepare(&mut ps, &mut a, "keep", Q1);
    let (_, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "bad1", "select bad");
            parse(b, "s2", Q2); // the connection has it: would be answered locally
            close(b, b'S', "keep"); // answered locally too
            bind(b, "", "s2", "x");
            sync(b);
        }),
    );
    assert_eq!(saw, ["E:42601", "Z"]);
    assert!(
        ps.client().get(b"s2").is_none(),
        "skipped Parse rolled back"
    );
    assert!(
        ps.client().get(b"keep").is_some(),
        "skipped Close rolled back"
    );
    assert!(ps.client().get(b"bad1").is_none());
}

#[test]
fn skipped_eviction_is_restored() {
    let mut ps = PreparedStatements::new(&cfg(10, 1));
    let mut a = Conn {
        statements: ServerStatements::new(1),
        backend: Backend::default(),
    };
    prepare(&mut ps, &mut a, "s1", Q1);
    let (to_server, saw) = run(
        &mut ps,
        &mut a,
        &batch(|b| {
            bind(b, "", "nope", "x"); // fails first
            parse(b, "s2", Q2); // would evict s1's statement
            sync(b);
        }),
    );
    assert_eq!(to_server[1], format!("C S {}", name_of(Q1)));
    assert_eq!(saw, ["E:26000", "Z"]);
    let (n1, present) = a
        .statements
        .resolve(&StatementDef::new(Q1.as_bytes(), &[0, 0]));
    assert!(present && a.backend.statements.contains_key(&n1.to_string()));
    // And it is used without a new Parse.
    let (to_server, saw) = run(&mut ps, &mut a, &bind_execute("s1"));
    assert_eq!(to_server, [format!("B |{n1}"), "E".into(), "S".into()]);
    assert_eq!(saw, ["2", "D", "C", "Z"]);
}

#[test]
fn error_before_the_sync_is_sent_skips_what_follows() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    // The client pipelines without Sync; the error arrives before the rest is rewritten.
    let (_, first) = round_trip(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "bad", "select bad");
            frontend::flush(b);
        }),
    );
    assert_eq!(seen(&first), ["E:42601"]);
    let (_, rest) = round_trip(
        &mut ps,
        &mut a,
        &batch(|b| {
            parse(b, "s2", Q2);
            close(b, b'S', "s1");
            sync(b);
        }),
    );
    assert_eq!(seen(&rest), ["Z"]);
    assert!(ps.idle());
    assert!(ps.client().get(b"s2").is_none() && ps.client().get(b"s1").is_some());
}

#[test]
fn too_many_statements_fail_with_53400_until_one_is_closed() {
    let mut ps = PreparedStatements::new(&cfg(2, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    prepare(&mut ps, &mut a, "s2", Q2);
    assert_eq!(prepare(&mut ps, &mut a, "s3", "select 3"), ["E:53400", "Z"]);
    assert_eq!(ps.client().len(), 2);
    run(
        &mut ps,
        &mut a,
        &batch(|b| {
            close(b, b'S', "s1");
            sync(b);
        }),
    );
    assert_eq!(prepare(&mut ps, &mut a, "s3", "select 3"), ["1", "Z"]);
}

#[test]
fn malformed_frames_are_errors() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let mut out = BytesMut::new();
    // A Parse without the NUL after its name.
    let bad = [b'P', 0, 0, 0, 6, b's', b'1'];
    assert_eq!(
        ps.rewrite(&bad, &mut a.statements, &mut out),
        Err(PreparedError::Malformed(b'P'))
    );
    // A length running past the buffer.
    let short = [b'S', 0, 0, 0, 9];
    assert!(ps.rewrite(&short, &mut a.statements, &mut out).is_err());
}

#[test]
fn a_cycle_the_relay_adds_is_hidden_from_the_client() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    prepare(&mut ps, &mut a, "s1", Q1);
    // The relay sends its own query first, pipelined with the client's request.
    let mut to_server = batch(|m| query(m, "select set_config('app.tenant', 'acme', false)"));
    ps.hidden_cycle(&mut a.statements);
    ps.rewrite(&bind_execute("s1"), &mut a.statements, &mut to_server)
        .unwrap();
    let answers = a.backend.run(&to_server);
    assert_eq!(seen(&answers), ["C", "Z", "2", "D", "C", "Z"]);
    let mut to_client = BytesMut::new();
    relay_answers(&mut ps, &mut a.statements, &answers, &mut to_client);
    assert_eq!(seen(&to_client), ["2", "D", "C", "Z"]);
    assert!(ps.idle());
}

#[test]
fn a_failing_cycle_of_the_relay_aborts() {
    let mut ps = PreparedStatements::new(&cfg(10, 10));
    let mut a = conn(10);
    let mut to_server = batch(|m| query(m, "select bad"));
    ps.hidden_cycle(&mut a.statements);
    let answers = a.backend.run(&to_server);
    let mut actions = Vec::new();
    let mut sink = BytesMut::new();
    for (tag, body) in frames(&answers) {
        actions.push(ps.on_server_message(tag, &body, &mut a.statements, &mut sink));
    }
    assert_eq!(actions, [ServerAction::Abort, ServerAction::Drop]);
    to_server.clear();
}
