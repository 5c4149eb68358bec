//! DNS over UDP, served here rather than by hickory's listener: datagrams arrive and leave
//! in batches (`recvmmsg`/`sendmmsg`, one system call for up to [`BATCH`]); a question
//! answered before is answered in the loop from its wire bytes ([`crate::wire`]); any other
//! gets a task of its own on the full path (a forwarded name may wait on an upstream), whose
//! answer is kept when it may be. The rate limit, the recursion networks and the metrics
//! apply to both paths alike.
#![allow(unsafe_code)] // recvmmsg/sendmmsg through libc: plain buffers and addresses, checked lengths.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::capture::Capture;
use crate::rate::Verdict;
use crate::wire;
use crate::MeshDns;

/// Datagrams received (and answers sent) per system call at most.
const BATCH: usize = 32;
/// Room for one datagram; a longer one is no query this server answers, and is dropped.
const DATAGRAM: usize = 4096;

/// Serves `handler` on a bound UDP socket until the future is dropped.
pub async fn serve_udp(handler: Arc<MeshDns>, udp: UdpSocket) -> io::Result<()> {
    let udp = Arc::new(udp);
    let mut slots: Vec<Slot> = (0..BATCH).map(|_| Slot::new()).collect();
    let mut key = Vec::with_capacity(64);
    loop {
        udp.readable().await?;
        let received = match udp.try_io(Interest::READABLE, || receive(udp.as_raw_fd(), &mut slots)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // An ICMP error from an earlier answer's destination, say: not this loop's end.
                tracing::debug!(error = %e, "dns: receiving failed");
                continue;
            }
        };
        let now = Instant::now();
        let mut answered = 0;
        {
            let kept = handler.answers.lock();
            for slot in &mut slots[..received] {
                slot.reply.clear();
                let Some(src) = slot.source() else { continue };
                if slot.truncated {
                    continue;
                }
                let packet = &slot.buf[..slot.len];
                let verdict = handler.udp_rate.check(src.ip(), now);
                let recursion = handler.may_recurse(src.ip());
                let question = (verdict == Verdict::Answer)
                    .then(|| wire::read_query(packet, recursion, &mut key))
                    .flatten();
                if let Some((end, answer)) = question.and_then(|end| Some((end, kept.get(&key, now)?))) {
                    answer.answer(packet, end, &mut slot.reply);
                    handler.count_kept(answer, now);
                    answered += 1;
                    continue;
                }
                let learn = question.map(|end| (std::mem::take(&mut key), end));
                tokio::spawn(full_path(handler.clone(), udp.clone(), packet.to_vec(), src, verdict, learn));
            }
        }
        if answered > 0 {
            send_all(&udp, &mut slots[..received]).await;
        }
    }
}

/// One receive buffer and the address of its datagram, then its answer.
struct Slot {
    buf: Vec<u8>,
    len: usize,
    truncated: bool,
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
    /// The answer to send back (empty: none from the loop).
    reply: Vec<u8>,
}

impl Slot {
    fn new() -> Self {
        // SAFETY: sockaddr_storage is plain bytes; all zeros is a valid (unspecified) address.
        let addr = unsafe { zeroed() };
        Self {
            buf: vec![0; DATAGRAM],
            len: 0,
            truncated: false,
            addr,
            addr_len: 0,
            reply: Vec::with_capacity(512),
        }
    }

    fn source(&self) -> Option<SocketAddr> {
        match i32::from(self.addr.ss_family) {
            libc::AF_INET if self.addr_len as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in here (family and length checked).
                let a = unsafe { &*std::ptr::from_ref(&self.addr).cast::<libc::sockaddr_in>() };
                let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 if self.addr_len as usize >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the kernel wrote a sockaddr_in6 here (family and length checked).
                let a = unsafe { &*std::ptr::from_ref(&self.addr).cast::<libc::sockaddr_in6>() };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Receives up to a batch of datagrams without waiting; how many arrived.
fn receive(fd: RawFd, slots: &mut [Slot]) -> io::Result<usize> {
    // SAFETY: iovec and mmsghdr are plain structs; zeros are valid before they are filled.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdr: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for ((slot, iov), hdr) in slots.iter_mut().zip(&mut iov).zip(&mut hdr) {
        *iov = libc::iovec { iov_base: slot.buf.as_mut_ptr().cast(), iov_len: slot.buf.len() };
        hdr.msg_hdr.msg_name = std::ptr::from_mut(&mut slot.addr).cast();
        hdr.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_hdr.msg_iov = iov;
        hdr.msg_hdr.msg_iovlen = 1;
    }
    let count = slots.len().min(BATCH) as libc::c_uint;
    // SAFETY: every header points at a live buffer and address of `slots`, sized as given.
    let n = unsafe { libc::recvmmsg(fd, hdr.as_mut_ptr(), count, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    for (slot, hdr) in slots.iter_mut().zip(&hdr).take(n) {
        slot.len = hdr.msg_len as usize;
        slot.truncated = hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        slot.addr_len = hdr.msg_hdr.msg_namelen;
    }
    Ok(n)
}

/// Sends every slot's answer to its datagram's source, waiting while the socket's buffer is
/// full. An answer the kernel refuses (an unreachable address) is dropped, not retried.
async fn send_all(udp: &UdpSocket, slots: &mut [Slot]) {
    let mut pending = [0usize; BATCH];
    let mut count = 0;
    for (i, _) in slots.iter().enumerate().filter(|(_, s)| !s.reply.is_empty()) {
        pending[count] = i;
        count += 1;
    }
    let mut done = 0;
    while done < count {
        match udp.try_io(Interest::WRITABLE, || send(udp.as_raw_fd(), slots, &pending[done..count])) {
            Ok(sent) => done += sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if udp.writable().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "dns: sending an answer failed");
                done += 1;
            }
        }
    }
}

/// Sends the answers of the slots `which` names, in order, without waiting; how many went
/// (an error: the first one's).
fn send(fd: RawFd, slots: &mut [Slot], which: &[usize]) -> io::Result<usize> {
    // SAFETY: as in `receive`.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut hdr: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for ((&i, iov), hdr) in which.iter().zip(&mut iov).zip(&mut hdr) {
        let slot = &mut slots[i];
        *iov = libc::iovec { iov_base: slot.reply.as_mut_ptr().cast(), iov_len: slot.reply.len() };
        hdr.msg_hdr.msg_name = std::ptr::from_mut(&mut slot.addr).cast();
        hdr.msg_hdr.msg_namelen = slot.addr_len;
        hdr.msg_hdr.msg_iov = iov;
        hdr.msg_hdr.msg_iovlen = 1;
    }
    let count = which.len().min(BATCH) as libc::c_uint;
    // SAFETY: every header points at a live answer and address of `slots`, sized as given.
    let n = unsafe { libc::sendmmsg(fd, hdr.as_mut_ptr(), count, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The full path for one datagram: hickory parses it, [`MeshDns::respond`] answers it, the
/// answer goes back from this task and is kept for the next time the same question comes
/// (`learn`: its key and where its question ends) when it may be.
async fn full_path(
    handler: Arc<MeshDns>,
    udp: Arc<UdpSocket>,
    packet: Vec<u8>,
    src: SocketAddr,
    verdict: Verdict,
    learn: Option<(Vec<u8>, usize)>,
) {
    let header = packet.get(..12).map(|h| [h[0], h[1], h[2], h[3]]);
    let generation = handler.answers.generation();
    let Ok(request) = Request::from_bytes(packet, src, Protocol::Udp) else {
        // Not a DNS message. With a whole header that asks something (not a response, which
        // could be part of a loop), FORMERR as hickory answers; else silence.
        if let Some([a, b, flags, _]) = header.filter(|h| h[2] & 0x80 == 0) {
            let formerr = [a, b, 0x80 | (flags & 0x79), 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
            let _ = udp.send_to(&formerr, src).await;
        }
        return;
    };
    if request.metadata.message_type == hickory_server::proto::op::MessageType::Response {
        return; // never answer an answer (reflection loops)
    }
    let capture = Capture::default();
    let (info, reuse) = handler.respond(&request, verdict, capture.clone()).await;
    let bytes = capture.take();
    if bytes.is_empty() {
        return;
    }
    if let Err(e) = udp.send_to(&bytes, src).await {
        tracing::debug!(error = %e, %src, "dns: sending an answer failed");
        return;
    }
    if let Some((key, end)) = learn {
        let counter = handler.query_counter(&request, info.response_code);
        handler.answers.keep(generation, key, end, bytes, reuse, counter);
    }
}
