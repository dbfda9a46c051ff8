//! Randomized: clients of one tenant run random batches over two server connections with
//! tiny caches (evictions, re-Parses, refusals, errors everywhere); each client must see
//! exactly what one PostgreSQL connection of its own would have answered.

use super::*;

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const TEXTS: [&str; 4] = ["select 1", "select 2", "select nodata", "select bad"];

/// One random batch ending with Sync (or a lone simple Query).
fn random_batch(rng: &mut StdRng) -> BytesMut {
    let mut b = BytesMut::new();
    let pick = |rng: &mut StdRng, xs: &[&'static str]| xs[rng.gen_range(0..xs.len())];
    if rng.gen_ratio(1, 8) {
        let sql = match rng.gen_range(0..4) {
            0 => format!("DEALLOCATE {}", pick(rng, &NAMES)),
            1 => "DEALLOCATE ALL".to_string(),
            2 => "select bad".to_string(),
            _ => "select 3".to_string(),
        };
        query(&mut b, &sql);
        return b;
    }
    for _ in 0..rng.gen_range(1..6) {
        match rng.gen_range(0..7) {
            0 | 1 => parse(&mut b, pick(rng, &NAMES), pick(rng, &TEXTS)),
            2 | 3 => {
                bind(&mut b, "", pick(rng, &NAMES), "v");
                execute(&mut b, "");
            }
            4 => describe(&mut b, b'S', pick(rng, &NAMES)),
            5 => close(&mut b, b'S', pick(rng, &NAMES)),
            _ => {
                // The unnamed statement, within one batch.
                parse(&mut b, "", pick(rng, &TEXTS));
                bind(&mut b, "", "", "v");
                describe(&mut b, b'P', "");
                execute(&mut b, "");
            }
        }
    }
    sync(&mut b);
    b
}

struct Client {
    ps: PreparedStatements,
    direct: Backend,
}

fn check_seed(seed: u64, pipelining: bool) -> Counters {
    let mut rng = StdRng::seed_from_u64(seed);
    let per_client = 3;
    let mut clients: Vec<Client> = (0..3)
        .map(|_| Client {
            ps: PreparedStatements::new(&cfg(per_client, 2)),
            direct: Backend {
                max_named: Some(per_client),
                ..Backend::default()
            },
        })
        .collect();
    let mut conns = [conn(2), conn(2)];
    let mut total = Counters::default();
    for step in 0..200 {
        let c = rng.gen_range(0..clients.len());
        let k = rng.gen_range(0..conns.len());
        // Sometimes the client pipelines several batches before reading any answer.
        let mut b = random_batch(&mut rng);
        while pipelining && rng.gen_ratio(1, 2) {
            b.extend_from_slice(&random_batch(&mut rng));
        }
        let client = &mut clients[c];
        let expected = seen(&client.direct.run(&b));
        let (to_server, saw) = round_trip(&mut client.ps, &mut conns[k], &b);
        assert_eq!(
            seen(&saw),
            expected,
            "seed {seed} step {step}: client {c} on connection {k}\nclient sent {:?}\nserver got {:?}",
            sent(&b),
            sent(&to_server)
        );
        assert!(
            client.ps.idle(),
            "seed {seed} step {step}: answers left over"
        );
        let counted = client.ps.take_counters();
        total.reparsed += counted.reparsed;
        total.evicted += counted.evicted;
        total.hits += counted.hits;
        // The bookkeeping matches both backends exactly.
        let mut names: Vec<_> = client
            .direct
            .statements
            .keys()
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        for name in &names {
            let def = client.ps.client().get(name.as_bytes()).expect("client map");
            assert_eq!(
                def.query.as_ref(),
                client.direct.statements[*name].as_bytes()
            );
        }
        assert_eq!(
            client.ps.client().len(),
            names.len(),
            "seed {seed} step {step}"
        );
        for conn in &conns {
            let mut on_server: Vec<_> = conn
                .backend
                .statements
                .keys()
                .filter(|n| n.starts_with("pgt_"))
                .collect();
            on_server.sort();
            assert_eq!(
                on_server.len(),
                conn.statements.len(),
                "seed {seed} step {step}: server has {on_server:?}\nclient sent {:?}\nserver got {:?}",
                sent(&b),
                sent(&to_server)
            );
            assert!(
                conn.statements.len() <= 2 + 1,
                "bounded (one over while in use)"
            );
        }
    }
    total
}

/// The runs went through every path: re-Parses, evictions and locally answered Parses.
fn check_seeds(pipelining: bool) {
    let mut total = Counters::default();
    for seed in 0..150 {
        let c = check_seed(seed, pipelining);
        total.reparsed += c.reparsed;
        total.evicted += c.evicted;
        total.hits += c.hits;
    }
    assert!(
        total.reparsed > 100 && total.evicted > 100 && total.hits > 100,
        "{total:?}"
    );
}

#[test]
fn clients_see_what_one_connection_would_answer() {
    check_seeds(false);
}

#[test]
fn pipelined_batches_see_what_one_connection_would_answer() {
    check_seeds(true);
}
