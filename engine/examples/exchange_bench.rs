//! Times the host-staged MoE exchange on its own: two ranks (threads) over the TCP transport on
//! loopback, each sending every other rank `--rows` hidden-state rows of `--hidden` f32 in the
//! wire format the expert-parallel executors use (expert id, then the row). Prints, per round
//! and rank, the time to encode, exchange and decode, with the encoding's and decoding's rate.
//!
//! ```sh
//! cargo run --release -p deepseek-engine --example exchange_bench -- --rows 2048 --hidden 7168
//! ```
//!
//! 2,048 rows of 7,168 each way is half of a 512-token prefill's 4,096 routed rows per MoE
//! layer, the share one rank of two sends the other.

use std::time::{Duration, Instant};

use deepseek_engine::dist::{GroupEnv, Reader, TcpOptions, TcpTransport, Transport, Writer};

struct Args {
    rows: usize,
    hidden: usize,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        rows: 2048,
        hidden: 7168,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let n: usize = value
            .parse()
            .map_err(|_| format!("{flag}: {value:?} is not a count"))?;
        match flag.as_str() {
            "--rows" => a.rows = n,
            "--hidden" => a.hidden = n,
            "--rounds" => a.rounds = n,
            _ => return Err(format!("unknown flag {flag} (--rows, --hidden, --rounds)")),
        }
    }
    if a.rows == 0 || a.hidden == 0 || a.rounds == 0 {
        return Err("--rows, --hidden and --rounds must be positive".into());
    }
    a.rows
        .checked_mul(a.hidden)
        .and_then(|v| v.checked_mul(4))
        .ok_or("--rows x --hidden overflows")?;
    Ok(a)
}

fn rank(rank: usize, leader: String, a: &Args) -> Result<(), String> {
    let env = GroupEnv {
        rank,
        world_size: 2,
        leader_addr: leader,
    };
    let mut t = TcpTransport::connect(&env, TcpOptions::new(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let (rows, h) = (a.rows, a.hidden);
    let values = vec![1.5f32; rows * h];
    let gb = (rows * h * 4) as f64 / 1e9;
    for round in 0..a.rounds {
        let t0 = Instant::now();
        let parts: Vec<Vec<u8>> = (0..2)
            .map(|_| {
                let mut w = Writer::with_capacity(4 + rows * (12 + 4 * h));
                w.u32(rows as u32);
                for r in values.chunks_exact(h) {
                    w.u32(3).f32s(r);
                }
                w.finish()
            })
            .collect();
        let t1 = Instant::now();
        let got = t.all_to_all(parts).map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        let mut out = Vec::with_capacity(2 * rows * h);
        for (src, bytes) in got.iter().enumerate() {
            let mut r = Reader::new(bytes, src);
            for _ in 0..r.u32().map_err(|e| e.to_string())? {
                r.u32().map_err(|e| e.to_string())?;
                r.f32s_into(&mut out).map_err(|e| e.to_string())?;
            }
        }
        let t3 = Instant::now();
        let (enc, ex, dec) = (t1 - t0, t2 - t1, t3 - t2);
        println!(
            "rank {rank} round {round}: encode {:.1} ms ({:.2} GB/s), exchange {:.1} ms, decode {:.1} ms ({:.2} GB/s), {:.0} MB each way",
            enc.as_secs_f64() * 1e3,
            2.0 * gb / enc.as_secs_f64(),
            ex.as_secs_f64() * 1e3,
            dec.as_secs_f64() * 1e3,
            2.0 * gb / dec.as_secs_f64(),
            gb * 1e3
        );
    }
    Ok(())
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("exchange_bench: {e}");
            std::process::exit(2);
        }
    };
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => {
            eprintln!("exchange_bench: no free loopback port: {e}");
            std::process::exit(1);
        }
    };
    let leader = format!("127.0.0.1:{port}");
    let failed = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|r| {
                let (leader, a) = (leader.clone(), &a);
                s.spawn(move || rank(r, leader, a))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err("a rank panicked".into())))
            .filter_map(Result::err)
            .inspect(|e| eprintln!("exchange_bench: {e}"))
            .count()
    });
    if failed > 0 {
        std::process::exit(1);
    }
}
