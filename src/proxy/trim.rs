//! Gives back the resident code pages a settled proxy does not need.
//!
//! dockerd runs one proxy per published port and address family, so a
//! proxy's resident set is multiplied by the number of ports. Almost all of
//! it is the binary's own code and read-only data, faulted in at start-up:
//! parsing flags, registering, the hand-over. Once the proxy has settled
//! (it handed the port to Envoy, or relays it), it needs a few pages of
//! that to wait on its link.
//!
//! `MADV_DONTNEED` on a private, read-only, file-backed mapping only drops
//! this process's page-table entries: the pages stay in the page cache,
//! shared with every other proxy, and whatever the proxy touches again is
//! mapped back by a minor fault, without reading the disk. A mapping that
//! holds a page of its own (written once, for example a relocated page, or
//! a debugger's breakpoint) is left alone: dropping it would lose the
//! write. Such a page is anonymous memory, so `Anonymous` in smaps is the
//! test. `Private_Dirty` is not: a binary written moments ago (installed,
//! or just linked) has page-cache pages that are dirty until writeback,
//! and smaps counts them as this process's dirty pages although they hold
//! only the file's own bytes. Writable mappings (data, heap, stacks) are
//! never touched.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

/// The ranges that can be dropped, read from `/proc/self/smaps` text: file
/// mappings that are private and not writable, hold pages, and hold no
/// anonymous (copied-on-write) page, whether or not the file's pages are
/// still dirty in the page cache.
pub fn droppable(smaps: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut current: Option<Candidate> = None;
    for line in smaps.lines() {
        if let Some(c) = Candidate::header(line) {
            if let Some(done) = current.take() {
                done.finish(&mut out);
            }
            current = Some(c);
            continue;
        }
        let Some(c) = current.as_mut() else { continue };
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kb = || {
            rest.trim()
                .strip_suffix("kB")
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        match key {
            "Rss" => c.rss = kb(),
            "Anonymous" => c.anonymous = kb(),
            _ => {}
        }
    }
    if let Some(done) = current {
        done.finish(&mut out);
    }
    out
}

struct Candidate {
    range: Range<usize>,
    /// Private, not writable, and backed by a file.
    eligible: bool,
    rss: Option<u64>,
    anonymous: Option<u64>,
}

impl Candidate {
    /// A mapping's first line: `start-end perms offset dev inode [path]`.
    fn header(line: &str) -> Option<Candidate> {
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let perms = fields.next()?.as_bytes();
        let _offset = fields.next()?;
        let _dev = fields.next()?;
        let inode: u64 = fields.next()?.parse().ok()?;
        if perms.len() != 4 || end <= start {
            return None;
        }
        let eligible = perms[0] == b'r' && perms[1] == b'-' && perms[3] == b'p' && inode != 0;
        Some(Candidate {
            range: start..end,
            eligible,
            rss: None,
            anonymous: None,
        })
    }

    fn finish(self, out: &mut Vec<Range<usize>>) {
        // Every figure must be there and say so: a field we could not read
        // keeps the mapping as it is.
        if self.eligible && self.rss.is_some_and(|r| r > 0) && self.anonymous == Some(0) {
            out.push(self.range);
        }
    }
}

/// Set by [`soon`], taken by [`before_sleep`].
static ASKED: AtomicBool = AtomicBool::new(false);

/// Asks for a trim the next time the thread is about to sleep.
pub fn soon() {
    ASKED.store(true, Ordering::Relaxed);
}

/// The runtime's park hook: runs an asked-for trim right before the thread
/// sleeps. Whatever code runs after a trim is faulted back in, and the
/// kernel maps a whole window (64 KiB by default) around each such fault;
/// here only the runtime's last steps into `epoll_wait` run after it, so
/// fewer windows come back than from inside the proxy's event loop.
pub fn before_sleep() {
    if ASKED.swap(false, Ordering::Relaxed) {
        now();
    }
}

/// Drops this process's clean code pages now. Returns the bytes of the
/// mappings it advised; failures only mean the pages stay.
pub fn now() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    // Everything allocated is freed before the first page goes, so that
    // the allocator's code is not faulted back in at once.
    let mut ranges = [(0usize, 0usize); 16];
    let mut n = 0;
    for r in droppable(&smaps).into_iter().take(ranges.len()) {
        ranges[n] = (r.start, r.end - r.start);
        n += 1;
    }
    drop(smaps);
    let mut advised = 0;
    for &(start, len) in &ranges[..n] {
        // SAFETY: the range is a whole private, read-only file mapping of
        // this process with no page of its own (see `droppable`): after
        // MADV_DONTNEED its contents are still the file's, faulted back in
        // on the next touch, so no memory this program can see changes.
        // Nothing in the proxy remaps or writes its code meanwhile.
        let r = unsafe { nix::libc::madvise(start as *mut _, len, nix::libc::MADV_DONTNEED) };
        if r == 0 {
            advised += len;
        }
    }
    advised
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
00400000-00401000 r--p 00000000 fe:00 10059790   /usr/bin/envoy-docker
Rss:                   4 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
00401000-0075c000 r-xp 00001000 fe:00 10059790   /usr/bin/envoy-docker
Rss:                1492 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
0075c000-00876000 r--p 0035c000 fe:00 10059790   /usr/bin/envoy-docker
Rss:                 508 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
00876000-0087b000 rw-p 00475000 fe:00 10059790   /usr/bin/envoy-docker
Rss:                  20 kB
Private_Dirty:        12 kB
Anonymous:            12 kB
00880000-00890000 r--s 00000000 fe:00 77   /dev/shm/x
Rss:                   8 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7fcd88c16000-7fcd88c2a000 rw-p 00000000 00:00 0
Rss:                  68 kB
Private_Dirty:        68 kB
Anonymous:            68 kB
7fcd88c34000-7fcd88c36000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   4 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7fcd88c40000-7fcd88c50000 r-xp 00000000 fe:00 555   /lib/libc.so
Rss:                   0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7fcd88c50000-7fcd88c60000 r-xp 00000000 fe:00 556   /lib/libm.so
Rss:                   8 kB
7fcd88c60000-7fcd88c70000 r-xp 00000000 fe:00 557   /lib/just-installed.so
Rss:                  64 kB
Private_Dirty:        64 kB
Anonymous:             0 kB
7ffedb259000-7ffedb27a000 rw-p 00000000 00:00 0                          [stack]
Rss:                  36 kB
Private_Dirty:        36 kB
Anonymous:            36 kB
";

    #[test]
    fn only_clean_private_read_only_file_pages_are_dropped() {
        // The code and the first page go; the relocated read-only data
        // (a page of its own), the data, a shared mapping, anonymous
        // memory, the vDSO, an empty mapping, and one whose figures are
        // missing all stay. A library written moments ago (its page-cache
        // pages still dirty, none of them anonymous) goes too.
        assert_eq!(
            droppable(SMAPS),
            vec![
                0x400000..0x401000,
                0x401000..0x75c000,
                0x7fcd88c60000..0x7fcd88c70000
            ]
        );
    }

    #[test]
    fn nonsense_drops_nothing() {
        assert!(droppable("").is_empty());
        assert!(droppable("not smaps\nRss: 4 kB\n").is_empty());
        assert!(droppable("00400000-00300000 r-xp 0 fe:00 1 /x\nRss: 4 kB\nAnonymous: 0 kB\nPrivate_Dirty: 0 kB\n").is_empty());
        assert!(droppable("00400000-00500000 r-xp 0 fe:00 1 /x\nRss: many\nAnonymous: 0 kB\nPrivate_Dirty: 0 kB\n").is_empty());
    }

    #[test]
    fn this_process_keeps_running_after_a_trim() {
        // The test binary drops its own code pages and goes on: the pages
        // come back from the page cache.
        let before = now();
        assert!(before > 0, "a test binary has clean code pages to drop");
        assert_eq!(
            droppable("00400000-00500000 r-xp 0 fe:00 1 /x\nRss: 4 kB\nAnonymous: 0 kB\nPrivate_Dirty: 0 kB\n"),
            vec![0x400000..0x500000]
        );
    }
}
