//! A small TCP rendezvous: rank 0 hands one blob (the NCCL unique id) to every other process
//! of the run, after checking that they agree on the world size and that every rank came
//! exactly once.
//!
//! Protocol, one connection per rank above 0: the rank sends `DPRV`, a version byte, its rank
//! and its world size (`u32` big-endian each); once every rank has joined, rank 0 answers each
//! with a status byte (0 ok, 1 refused) and a length-prefixed body: the blob, or the reason in
//! words. A refusal (a wrong world size, a rank seen twice) is sent to every process that
//! joined, so every process fails with the same message.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"DPRV";
const VERSION: u8 = 1;
/// How long rank 0 still takes ranks after refusing the rendezvous, to tell them why.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);
/// The largest blob or message accepted (an NCCL id is 128 bytes).
const MAX_BODY: u32 = 1 << 16;

/// Why a rendezvous failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    /// Rank 0 could not listen.
    #[error("rank 0 cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// The system's reason.
        reason: String,
    },
    /// A rank could not reach rank 0.
    #[error(
        "rank {rank} could not reach rank 0 at {addr} within {waited:?}: {reason} (is rank 0 running, and MASTER_ADDR/MASTER_PORT the same on every process?)"
    )]
    Unreachable {
        /// The rank that tried.
        rank: u32,
        /// MASTER_ADDR:MASTER_PORT.
        addr: String,
        /// How long it tried.
        waited: Duration,
        /// The last error.
        reason: String,
    },
    /// Not every rank joined in time.
    #[error("ranks {missing} did not join the rendezvous within {waited:?}")]
    Missing {
        /// The ranks that never came, comma separated.
        missing: String,
        /// How long rank 0 waited.
        waited: Duration,
    },
    /// The processes disagree, or a rank came twice; every process gets this message.
    #[error("the rendezvous was refused: {0}")]
    Refused(String),
    /// A peer did not speak the protocol, or the connection broke.
    #[error("rendezvous with {peer}: {reason}")]
    Protocol {
        /// Who (an address or `rank 0`).
        peer: String,
        /// What went wrong.
        reason: String,
    },
}

/// Rank 0's side: listens on `listener` until every rank `1..world_size` has joined or
/// `timeout` has passed, then hands each the `blob`. Checks that all say `world_size` and
/// that no rank joins twice; on any disagreement, every joined rank is told why and the same
/// error is returned here.
pub fn serve(
    listener: &TcpListener,
    world_size: u32,
    blob: &[u8],
    timeout: Duration,
) -> Result<(), RendezvousError> {
    let deadline = Instant::now() + timeout;
    let local = listener
        .local_addr()
        .map_or_else(|_| "the listener".to_string(), |a| a.to_string());
    let io_error = |reason: io::Error| RendezvousError::Protocol {
        peer: local.clone(),
        reason: reason.to_string(),
    };
    listener.set_nonblocking(true).map_err(io_error)?;
    let mut joined: BTreeMap<u32, TcpStream> = BTreeMap::new();
    let mut refusal: Option<String> = None;
    // After a refusal, ranks still to come are taken for a short while longer, so that the
    // processes already connecting get the reason too, not only those that came before it.
    let mut refused_until: Option<Instant> = None;
    while joined.len() + 1 < world_size as usize {
        if refusal.is_some() && refused_until.is_none() {
            refused_until = Some(deadline.min(Instant::now() + REFUSAL_GRACE));
        }
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream.set_nonblocking(false).map_err(io_error)?;
                let remaining = deadline.saturating_duration_since(Instant::now());
                let _ = stream.set_read_timeout(Some(remaining.max(Duration::from_millis(10))));
                match read_hello(&mut stream, peer) {
                    Ok((rank, theirs)) if theirs != world_size => {
                        refusal.get_or_insert_with(|| format!(
                            "rank {rank} has WORLD_SIZE={theirs}, but rank 0 has WORLD_SIZE={world_size}"
                        ));
                        joined.entry(rank).or_insert(stream);
                    }
                    Ok((0, _)) => {
                        let reason =
                            refusal.get_or_insert_with(|| "a second process has RANK=0".into());
                        let _ = reply(&mut stream, Err(reason));
                    }
                    Ok((rank, _)) if joined.contains_key(&rank) => {
                        let reason = refusal
                            .get_or_insert_with(|| format!("two processes have RANK={rank}"));
                        let _ = reply(&mut stream, Err(reason));
                    }
                    Ok((rank, _)) if rank >= world_size => {
                        let reason = refusal.get_or_insert_with(|| {
                            format!("a process has RANK={rank}, outside WORLD_SIZE={world_size}")
                        });
                        let _ = reply(&mut stream, Err(reason));
                    }
                    Ok((rank, _)) => {
                        joined.insert(rank, stream);
                    }
                    // Something that is not one of ours (a port scanner, a stale process):
                    // tell it and keep waiting for the real ranks.
                    Err(reason) => {
                        let _ = reply(&mut stream, Err(&reason));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if refused_until.is_some_and(|until| Instant::now() >= until) {
                    break;
                }
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..world_size)
                        .filter(|r| !joined.contains_key(r))
                        .map(|r| r.to_string())
                        .collect();
                    let error = RendezvousError::Missing {
                        missing: missing.join(", "),
                        waited: timeout,
                    };
                    for stream in joined.values_mut() {
                        let _ = reply(stream, Err(&error.to_string()));
                    }
                    return Err(error);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_error(e)),
        }
    }
    if let Some(reason) = refusal {
        for stream in joined.values_mut() {
            let _ = reply(stream, Err(&reason));
        }
        return Err(RendezvousError::Refused(reason));
    }
    for (rank, stream) in &mut joined {
        reply(stream, Ok(blob)).map_err(|e| RendezvousError::Protocol {
            peer: format!("rank {rank}"),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// A rank's side: connects to rank 0 at `master` (retrying until `timeout`, since rank 0 may
/// start later, and trying every address the name resolves to), introduces itself and returns
/// the blob rank 0 hands out.
pub fn join(
    master: &str,
    rank: u32,
    world_size: u32,
    timeout: Duration,
) -> Result<Vec<u8>, RendezvousError> {
    join_resolved(
        master,
        || {
            master
                .to_socket_addrs()
                .map(|addrs| addrs.collect())
                .map_err(|e| e.to_string())
        },
        rank,
        world_size,
        timeout,
    )
}

/// The longest one connection attempt to one address may take, so that an address that
/// swallows packets does not use the whole timeout before the next address is tried.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);

/// Connects to the first of `addrs` that answers, in order; on failure, every address and why.
fn connect_any(addrs: &[SocketAddr], deadline: Instant) -> Result<TcpStream, String> {
    if addrs.is_empty() {
        return Err("the name resolves to no address".into());
    }
    let mut reasons = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = left.min(CONNECT_ATTEMPT).max(Duration::from_millis(10));
        match TcpStream::connect_timeout(addr, limit) {
            Ok(stream) => return Ok(stream),
            Err(e) => reasons.push(format!("{addr}: {e}")),
        }
    }
    Err(reasons.join("; "))
}

/// [`join`] with the name's addresses given by `resolve` (asked again on each retry).
fn join_resolved(
    master: &str,
    resolve: impl Fn() -> Result<Vec<SocketAddr>, String>,
    rank: u32,
    world_size: u32,
    timeout: Duration,
) -> Result<Vec<u8>, RendezvousError> {
    let deadline = Instant::now() + timeout;
    let unreachable = |reason: String| RendezvousError::Unreachable {
        rank,
        addr: master.to_string(),
        waited: timeout,
        reason,
    };
    let mut stream = loop {
        let attempt = resolve().and_then(|addrs| connect_any(&addrs, deadline));
        match attempt {
            Ok(stream) => break stream,
            Err(reason) if Instant::now() >= deadline => return Err(unreachable(reason)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let protocol = |reason: String| RendezvousError::Protocol {
        peer: format!("rank 0 at {master}"),
        reason,
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(10))));
    let mut hello = Vec::with_capacity(13);
    hello.extend_from_slice(MAGIC);
    hello.push(VERSION);
    hello.extend_from_slice(&rank.to_be_bytes());
    hello.extend_from_slice(&world_size.to_be_bytes());
    stream
        .write_all(&hello)
        .map_err(|e| protocol(e.to_string()))?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).map_err(|e| {
        protocol(if is_timeout(&e) {
            format!("no answer within {timeout:?} (are all WORLD_SIZE processes started?)")
        } else {
            e.to_string()
        })
    })?;
    let body = read_body(&mut stream).map_err(protocol)?;
    match status[0] {
        0 => Ok(body),
        1 => Err(RendezvousError::Refused(
            String::from_utf8_lossy(&body).into_owned(),
        )),
        other => Err(protocol(format!("unknown status byte {other}"))),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn read_hello(stream: &mut TcpStream, peer: SocketAddr) -> Result<(u32, u32), String> {
    let mut hello = [0u8; 13];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("{peer} sent no rendezvous greeting: {e}"))?;
    if &hello[..4] != MAGIC || hello[4] != VERSION {
        return Err(format!(
            "{peer} does not speak the dualpipe rendezvous (version {VERSION})"
        ));
    }
    let word =
        |at: usize| u32::from_be_bytes([hello[at], hello[at + 1], hello[at + 2], hello[at + 3]]);
    Ok((word(5), word(9)))
}

fn reply(stream: &mut TcpStream, answer: Result<&[u8], &str>) -> io::Result<()> {
    let (status, body) = match answer {
        Ok(blob) => (0u8, blob),
        Err(reason) => (1u8, reason.as_bytes()),
    };
    let mut message = Vec::with_capacity(5 + body.len());
    message.push(status);
    message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    message.extend_from_slice(body);
    stream.write_all(&message)?;
    stream.flush()
}

fn read_body(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(len);
    if len > MAX_BODY {
        return Err(format!("an answer of {len} bytes is too long"));
    }
    let mut body = vec![0u8; len as usize];
    stream.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// Runs the rendezvous for the process described by `env`: rank 0 listens on all interfaces
/// at the rendezvous port (`DUALPIPE_RENDEZVOUS_PORT`, else `MASTER_PORT + 1`: torchrun's
/// store holds `MASTER_PORT` itself) and hands out `make_blob()`'s result (it returns it too);
/// every other rank joins `MASTER_ADDR` at that port. `make_blob` is called only on rank 0.
/// Rank 0 listens on IPv4 (`0.0.0.0`), or on IPv6 (`[::]`) when `MASTER_ADDR` is an IPv6
/// address.
pub fn exchange(
    env: &crate::launch::LaunchEnv,
    make_blob: impl FnOnce() -> Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, RendezvousError> {
    if env.rank == 0 {
        let blob = make_blob();
        if env.world_size > 1 {
            let ipv6 = env
                .master_addr
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::Ipv6Addr>()
                .is_ok();
            let any = if ipv6 { "[::]" } else { "0.0.0.0" };
            let addr = format!("{any}:{}", env.rendezvous_port);
            let listener = TcpListener::bind(&addr).map_err(|e| RendezvousError::Bind {
                addr,
                reason: e.to_string(),
            })?;
            serve(&listener, env.world_size, &blob, timeout)?;
        }
        Ok(blob)
    } else {
        join(&env.rendezvous(), env.rank, env.world_size, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const BLOB: &[u8] = b"an nccl unique id of some bytes";

    /// Runs rank 0 on a loopback listener and one thread per entry of `ranks` as
    /// `(rank, world size)`; returns rank 0's result and each joiner's.
    #[allow(clippy::type_complexity)]
    fn run(
        world_size: u32,
        ranks: &[(u32, u32)],
        timeout: Duration,
    ) -> (
        Result<(), RendezvousError>,
        Vec<Result<Vec<u8>, RendezvousError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        // The joiners wait longer than rank 0, so that what they report is rank 0's answer,
        // not a race between two equal deadlines on a loaded machine.
        let patience = timeout + Duration::from_secs(5);
        let joiners: Vec<_> = ranks
            .iter()
            .map(|&(rank, world)| {
                let addr = addr.clone();
                thread::spawn(move || join(&addr, rank, world, patience))
            })
            .collect();
        let served = serve(&listener, world_size, BLOB, timeout);
        let joined = joiners.into_iter().map(|h| h.join().unwrap()).collect();
        (served, joined)
    }

    #[test]
    fn every_rank_gets_rank_zeros_blob() {
        let (served, joined) = run(4, &[(3, 4), (1, 4), (2, 4)], Duration::from_secs(10));
        served.unwrap();
        for result in joined {
            assert_eq!(result.unwrap(), BLOB);
        }
    }

    #[test]
    fn a_rank_that_starts_before_rank_zero_waits_for_it() {
        // Reserve a port, close it, start the joiner, then listen on it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let joiner = thread::spawn(move || join(&addr, 1, 2, Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(100));
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        serve(&listener, 2, BLOB, Duration::from_secs(10)).unwrap();
        assert_eq!(joiner.join().unwrap().unwrap(), BLOB);
    }

    #[test]
    fn a_wrong_world_size_fails_every_process_with_the_same_reason() {
        let (served, joined) = run(3, &[(1, 3), (2, 4)], Duration::from_secs(10));
        let reason = "rank 2 has WORLD_SIZE=4, but rank 0 has WORLD_SIZE=3";
        assert_eq!(served, Err(RendezvousError::Refused(reason.into())));
        for result in joined {
            assert_eq!(
                result.unwrap_err().to_string(),
                format!("the rendezvous was refused: {reason}")
            );
        }
    }

    #[test]
    fn a_rank_seen_twice_is_refused() {
        let (served, joined) = run(3, &[(1, 3), (1, 3)], Duration::from_secs(10));
        assert_eq!(
            served,
            Err(RendezvousError::Refused("two processes have RANK=1".into()))
        );
        assert!(
            joined
                .iter()
                .all(|r| matches!(r, Err(RendezvousError::Refused(_))))
        );
        let (served, _) = run(2, &[(0, 2)], Duration::from_secs(10));
        assert_eq!(
            served,
            Err(RendezvousError::Refused(
                "a second process has RANK=0".into()
            ))
        );
        let (served, _) = run(2, &[(5, 2)], Duration::from_secs(10));
        assert_eq!(
            served,
            Err(RendezvousError::Refused(
                "a process has RANK=5, outside WORLD_SIZE=2".into()
            ))
        );
    }

    #[test]
    fn missing_ranks_end_the_rendezvous_after_the_timeout() {
        let (served, joined) = run(4, &[(2, 4)], Duration::from_millis(300));
        let error = served.unwrap_err();
        assert_eq!(
            error.to_string(),
            "ranks 1, 3 did not join the rendezvous within 300ms"
        );
        assert_eq!(
            joined[0].as_ref().unwrap_err().to_string(),
            format!("the rendezvous was refused: {error}")
        );
    }

    #[test]
    fn no_rank_zero_is_an_error_naming_the_address() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let error = join(&addr, 1, 2, Duration::from_millis(200)).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with(&format!(
                "rank 1 could not reach rank 0 at {addr} within 200ms"
            )),
            "{text}"
        );
    }

    #[test]
    fn a_stranger_on_the_port_is_turned_away_and_the_real_ranks_still_join() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Queued before the real rank, so rank 0 meets it first.
        let mut stranger = TcpStream::connect(addr).unwrap();
        stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        stranger
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let addr_text = addr.to_string();
        let joiner = thread::spawn(move || join(&addr_text, 1, 2, Duration::from_secs(10)));
        serve(&listener, 2, BLOB, Duration::from_secs(10)).unwrap();
        assert_eq!(joiner.join().unwrap().unwrap(), BLOB);
        let mut answer = vec![0u8; 200];
        let n = stranger.read(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
        assert!(
            answer.contains("does not speak the dualpipe rendezvous"),
            "{answer}"
        );
    }

    #[test]
    fn a_single_process_needs_no_network() {
        let env = crate::launch::LaunchEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "unused.invalid".into(),
            master_port: 1,
            rendezvous_port: 2,
        };
        assert_eq!(
            exchange(&env, || BLOB.to_vec(), Duration::from_millis(10)).unwrap(),
            BLOB
        );
    }

    /// A free loopback port whose next port is free too.
    fn two_free_ports() -> u16 {
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                return port;
            }
        }
    }

    #[test]
    fn the_rendezvous_leaves_master_port_to_torchruns_store() {
        let master_port = two_free_ports();
        // torchrun's store, holding MASTER_PORT on rank 0's node for the whole run.
        let _store = TcpListener::bind(("127.0.0.1", master_port)).unwrap();
        let env = |rank| crate::launch::LaunchEnv {
            rank,
            world_size: 2,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port,
            rendezvous_port: crate::launch::rendezvous_port(master_port),
        };
        let joiner = {
            let env = env(1);
            thread::spawn(move || exchange(&env, Vec::new, Duration::from_secs(10)))
        };
        let served = exchange(&env(0), || BLOB.to_vec(), Duration::from_secs(10));
        assert_eq!(served.unwrap(), BLOB);
        assert_eq!(joiner.join().unwrap().unwrap(), BLOB);
    }

    #[test]
    fn every_resolved_address_is_tried() {
        // The first address refuses (nothing listens there); rank 0 is at the second.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let joiner = thread::spawn(move || {
            join_resolved(
                "rank0.example:1",
                || Ok(vec![closed, open]),
                1,
                2,
                Duration::from_secs(10),
            )
        });
        serve(&listener, 2, BLOB, Duration::from_secs(10)).unwrap();
        assert_eq!(joiner.join().unwrap().unwrap(), BLOB);
    }

    #[test]
    fn a_refused_peer_names_every_address_tried() {
        let closed: Vec<SocketAddr> = (0..2)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
            })
            .collect();
        let started = Instant::now();
        let error = join_resolved(
            "rank0.example:1",
            || Ok(closed.clone()),
            1,
            2,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "bounded");
        let text = error.to_string();
        for addr in &closed {
            assert!(text.contains(&addr.to_string()), "{text}");
        }
        let nothing = join_resolved(
            "rank0.example:1",
            || Ok(Vec::new()),
            1,
            2,
            Duration::from_millis(50),
        )
        .unwrap_err();
        assert!(
            nothing.to_string().contains("resolves to no address"),
            "{nothing}"
        );
    }
}
