//! The NCCL transport on real GPUs: byte-exact all-to-alls of variable-size parts (empty ones
//! included) over many rounds, and the device-side row exchange of the MoE dispatch shape.
//! Without a GPU or NCCL every test prints why and returns. One GPU gives a world of one;
//! several ranks on one GPU are tried too, and NCCL's refusal of that is reported, not failed.
//! With `DEEPSEEK_NCCL_GPUS=n` (n > 1 GPUs present) a world of n, one GPU per rank, is run.

use std::sync::mpsc;
use std::time::Duration;

use deepseek_engine::dist::nccl::{self, NcclTransport};
use deepseek_engine::dist::{GroupEnv, Transport};

fn nccl_or_skip() -> bool {
    match nccl::unavailable_reason() {
        Some(why) => {
            eprintln!("skipping: {why}");
            false
        }
        None => true,
    }
}

/// Deterministic bytes that differ per (round, source, destination, index).
fn part(round: usize, src: usize, dst: usize, len: usize) -> Vec<u8> {
    let mut x = ((round as u64 + 1) * 0x9e37_79b9_7f4a_7c15) ^ (((src as u64) << 32) | dst as u64);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Lengths that cover empty parts, odd sizes and a multi-megabyte part.
fn len_of(round: usize, src: usize, dst: usize) -> usize {
    match (round + src * 3 + dst) % 5 {
        0 => 0,
        1 => 1,
        2 => 4099,
        3 => 3 << 20,
        _ => 77,
    }
}

/// Runs `rounds` all-to-alls on every endpoint (one thread each) and checks every byte.
fn check_group(group: Vec<NcclTransport>, rounds: usize) {
    let world = group.len();
    let (tx, rx) = mpsc::channel();
    for mut t in group {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let me = t.rank();
            let res = (|| -> Result<(), String> {
                for round in 0..rounds {
                    let parts = (0..world)
                        .map(|d| part(round, me, d, len_of(round, me, d)))
                        .collect();
                    let got = t.all_to_all(parts).map_err(|e| e.to_string())?;
                    if got.len() != world {
                        return Err(format!("{} parts for a world of {world}", got.len()));
                    }
                    for (src, m) in got.iter().enumerate() {
                        if *m != part(round, src, me, len_of(round, src, me)) {
                            return Err(format!(
                                "round {round}: rank {me} got wrong bytes from rank {src} ({} bytes)",
                                m.len()
                            ));
                        }
                    }
                }
                Ok(())
            })();
            let _ = tx.send((me, res));
        });
    }
    drop(tx);
    for _ in 0..world {
        let (rank, res) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("an NCCL rank hung for 120 s");
        if let Err(e) = res {
            panic!("rank {rank}: {e}");
        }
    }
}

#[test]
fn a_world_of_one_exchanges_exact_bytes_through_nccl() {
    if !nccl_or_skip() {
        return;
    }
    let group = NcclTransport::in_process(&[0]).expect("NCCL world of one on device 0");
    check_group(group, 12);
}

#[test]
fn a_wrong_number_of_parts_is_an_error_not_a_panic() {
    if !nccl_or_skip() {
        return;
    }
    let mut t = NcclTransport::in_process(&[0]).unwrap().remove(0);
    let err = t
        .all_to_all(vec![vec![1], vec![2]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 parts for a world of 1"), "{err}");
    // The transport still works afterwards.
    assert_eq!(t.all_to_all(vec![vec![9; 5]]).unwrap(), vec![vec![9; 5]]);
}

#[test]
fn the_tcp_bootstrap_forms_a_group() {
    if !nccl_or_skip() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = GroupEnv {
        rank: 0,
        world_size: 1,
        leader_addr: format!("127.0.0.1:{port}"),
    };
    let t = NcclTransport::connect(&env, 0, Duration::from_secs(30)).expect("connect");
    check_group(vec![t], 3);
}

#[test]
fn rows_of_the_moe_dispatch_shape_arrive_exactly_on_the_device() {
    if !nccl_or_skip() {
        return;
    }
    let mut t = NcclTransport::in_process(&[0]).unwrap().remove(0);
    let (rows, width) = (37usize, 7168usize);
    let host: Vec<u16> = (0..rows * width)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u16)
        .collect();
    let stream = t.stream().clone();
    let send = stream.clone_htod(&host).unwrap();
    let mut recv = stream.alloc_zeros::<u16>(rows * width).unwrap();
    t.all_to_all_rows(&send, &[rows], &mut recv, &[rows], width)
        .unwrap();
    let back = stream.clone_dtoh(&recv).unwrap();
    stream.synchronize().unwrap();
    assert!(back == host, "rows differ after the device all-to-all");
    // Counts larger than the buffers are refused.
    let err = t
        .all_to_all_rows(&send, &[rows + 1], &mut recv, &[rows + 1], width)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs"), "{err}");
}

#[test]
fn two_ranks_on_one_gpu_exchange_exact_bytes_where_nccl_allows_it() {
    if !nccl_or_skip() {
        return;
    }
    // NCCL init of two ranks on one device can fail (duplicate GPU) or, on some versions, hang;
    // run it on a thread with a deadline so neither takes the test binary down.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(NcclTransport::in_process(&[0, 0]));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(group)) => {
            eprintln!("NCCL accepted two ranks on one GPU");
            check_group(group, 8);
        }
        Ok(Err(e)) => eprintln!("skipping the world of two on one GPU: NCCL refused it: {e}"),
        Err(_) => {
            eprintln!("skipping the world of two on one GPU: NCCL init did not return in 60 s")
        }
    }
}

#[test]
fn a_world_of_several_gpus_exchanges_exact_bytes() {
    if !nccl_or_skip() {
        return;
    }
    let want: usize = std::env::var("DEEPSEEK_NCCL_GPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let have = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    if want < 2 || have < want {
        eprintln!(
            "skipping: set DEEPSEEK_NCCL_GPUS to 2 or more (at most the {have} GPUs present)"
        );
        return;
    }
    let ordinals: Vec<usize> = (0..want).collect();
    let group = NcclTransport::in_process(&ordinals).expect("NCCL group over several GPUs");
    check_group(group, 12);
}
