//! `Notify` on the host (debug and release), with fake guests: who a ring reaches, the
//! wake-up edge, waits, sleeps, timers and injection order, ended vCPUs and guests,
//! unsubscribing, deadlock detection, name watches and the errors of bad arguments.

use super::*;
use alloc::vec::Vec;

/// A guest: its id, vCPU count and mounts (address, name).
struct G {
    id: u32,
    vcpus: u32,
    mounts: Vec<(u64, Name)>,
}

impl Guest for G {
    fn id(&self) -> u32 {
        self.id
    }
    fn vcpus(&self) -> u32 {
        self.vcpus
    }
    fn mounted(&self, gpa: u64) -> Option<Name> {
        self.mounts.iter().find(|m| m.0 == gpa).map(|m| m.1)
    }
}

fn name(s: &str) -> Name {
    Name::new(s.as_bytes()).unwrap()
}

/// Where every fake guest mounts "bell" and "other".
const BELL: u64 = 0x10_0000;
const OTHER: u64 = 0x20_0000;

fn guest(id: u32, vcpus: u32) -> G {
    G { id, vcpus, mounts: [(BELL, name("bell")), (OTHER, name("other"))].into() }
}

/// 10 TSC ticks per microsecond, at `now`.
fn at(now: u64) -> Clock {
    Clock { now, per_us: 10 }
}

/// Takes (polls) every pending bit of vCPU `v` of `g`.
fn take(n: &mut Notify, g: &G, v: u32) -> u64 {
    n.wait(g, v, u64::MAX, Timeout::Poll, at(0)).unwrap().unwrap()
}

/// Places every vCPU of `g` on CPU `cpu` (the scheduler looks at each) at time `now`.
fn place(n: &mut Notify, g: &G, cpu: usize, now: u64) {
    for v in 0..g.vcpus {
        let _ = n.ready(g, v, cpu, now);
    }
}

fn ring(n: &mut Notify, g: &G, vcpu: u32, me: usize, bits: u64) -> Result<Rung, Refused> {
    n.notify(g, vcpu, me, BELL, bits)
}

/// Rings where no wake-up matters (every vCPU on CPU 0, the caller's): asserts no IPI is asked.
fn rang(n: &mut Notify, g: &G, vcpu: u32, me: usize, bits: u64) {
    assert_eq!(ring(n, g, vcpu, me, bits).map(|r| r.kick), Ok(Kick(0)));
}

#[test]
fn notify_reaches_every_vcpu_of_every_subscriber_and_only_them() {
    let mut n = Notify::default();
    let (a, b, c, d) = (guest(0, 2), guest(1, 3), guest(2, 2), guest(3, 1));
    n.subscribe(&a, BELL, None).unwrap();
    n.subscribe(&b, BELL, None).unwrap();
    n.subscribe(&c, OTHER, None).unwrap();
    // `d` mounts "bell" and did not subscribe.
    let rung = ring(&mut n, &a, 0, 0, 0b101).unwrap();
    assert_eq!(rung.reached, 2, "both subscribers, the caller's guest included");
    assert_eq!(take(&mut n, &a, 0), 0, "not the calling vCPU itself");
    assert_eq!(take(&mut n, &a, 1), 0b101, "the caller's other vCPU");
    for v in 0..3 {
        assert_eq!(take(&mut n, &b, v), 0b101, "every vCPU of the other subscriber");
    }
    for v in 0..2 {
        assert_eq!(take(&mut n, &c, v), 0, "subscribed to another morsel");
    }
    assert_eq!(take(&mut n, &d, 0), 0, "mounted, not subscribed");
    assert_eq!(n.stats().delivered, 4);
    assert_eq!(n.stats().rung, 1);
    // `d`'s own ring reaches both subscribers' every vCPU.
    assert_eq!(ring(&mut n, &d, 0, 0, 1).unwrap().reached, 2);
    assert_eq!((take(&mut n, &a, 0), take(&mut n, &b, 2)), (1, 1));
}

#[test]
fn nobody_else_subscribed_is_no_receiver() {
    let mut n = Notify::default();
    let a = guest(0, 1);
    n.subscribe(&a, BELL, None).unwrap();
    assert_eq!(ring(&mut n, &a, 0, 0, 1), Err(Refused::NoReceiver(name("bell"))));
    assert_eq!(Refused::NoReceiver(name("bell")).error(), Error::NoReceiver);
    assert_eq!(n.stats().rung, 0);
}

#[test]
fn a_wake_up_is_sent_only_on_the_edge() {
    let mut n = Notify::default();
    let (a, b, c) = (guest(0, 1), guest(1, 1), guest(2, 1));
    n.subscribe(&a, BELL, None).unwrap();
    n.subscribe(&c, BELL, None).unwrap();
    place(&mut n, &a, 1, 0);
    place(&mut n, &c, 0, 0);
    assert_eq!(n.wait(&a, 0, 0b1, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.wait(&c, 0, 0b1, Timeout::Forever, at(0)), Ok(None));
    // From CPU 0: `a` on CPU 1 is woken by IPI, `c` on the ringing CPU itself is not.
    assert_eq!(ring(&mut n, &b, 0, 0, 0b1).unwrap().kick, Kick(0b10));
    assert_eq!(ring(&mut n, &b, 0, 0, 0b1).unwrap().kick, Kick(0), "bits already pending: no second IPI");
    assert_eq!(ring(&mut n, &b, 0, 0, 0b10).unwrap().kick, Kick(0), "bits it does not wait for");
    assert_eq!(n.stats().ipis, 1);
    assert_eq!(n.ready(&a, 0, 1, 0), Ready::Woke(0b1));
    // Taken, waiting again: the next ring is an edge again.
    assert_eq!(n.wait(&a, 0, 0b1, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(ring(&mut n, &b, 0, 2, 0b1).unwrap().kick, Kick(0b10));
    // A vCPU the scheduler never placed cannot be kicked.
    let d = guest(3, 1);
    n.subscribe(&d, BELL, None).unwrap();
    assert_eq!(n.wait(&d, 0, 0b100, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(ring(&mut n, &b, 0, 0, 0b100).unwrap().kick, Kick(0));
    assert_eq!(Kick(0b1010).cpus().collect::<Vec<_>>(), [1, 3]);
}

#[test]
fn a_vector_kicks_once_until_injected() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    n.subscribe(&a, BELL, Some(40)).unwrap();
    place(&mut n, &a, 2, 0);
    // Not waiting: the newly raised vector is the edge (the running CPU must re-enter).
    assert_eq!(ring(&mut n, &b, 0, 0, 1).unwrap().kick, Kick(0b100));
    assert_eq!(ring(&mut n, &b, 0, 0, 1).unwrap().kick, Kick(0), "vector still pending");
    assert_eq!(n.before_run(0, 0, 0, || true), Entry::Inject(40));
    assert_eq!(n.before_run(0, 0, 0, || true), Entry::Nothing, "injected once");
    assert_eq!(ring(&mut n, &b, 0, 0, 1).unwrap().kick, Kick(0b100), "raised anew after the injection");
    assert_eq!(n.injected(0), 1);
}

#[test]
fn wait_returns_pending_bits_at_once_and_parks_otherwise() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    n.subscribe(&a, BELL, None).unwrap();
    rang(&mut n, &b, 0, 0, 0b110);
    assert_eq!(n.wait(&a, 0, 0b011, Timeout::Forever, at(0)), Ok(Some(0b010)), "what it waits for, at once");
    assert_eq!(n.wait(&a, 0, u64::MAX, Timeout::Poll, at(0)), Ok(Some(0b100)), "the rest stayed pending");
    assert_eq!(n.wait(&a, 0, u64::MAX, Timeout::Poll, at(0)), Ok(Some(0)), "a poll never parks");
    assert_eq!(n.wait(&a, 0, 0b1, Timeout::Forever, at(0)), Ok(None), "parked");
    assert_eq!(n.ready(&a, 0, 0, 1 << 40), Ready::Waits, "forever has no deadline");
    rang(&mut n, &b, 0, 0, 0b11);
    assert_eq!(n.ready(&a, 0, 0, 0), Ready::Woke(0b1), "takes the bits it waited for");
    assert_eq!(n.ready(&a, 0, 0, 0), Ready::Run, "the wait is over");
    assert_eq!(take(&mut n, &a, 0), 0b10);
    assert_eq!(n.stats().wakeups, 1);
}

#[test]
fn wait_ends_at_its_deadline() {
    let mut n = Notify::default();
    let a = guest(0, 1);
    // 5 us at 10 ticks per us from 1000: the deadline is 1050.
    assert_eq!(n.wait(&a, 0, 0b1, Timeout::Micros(5), at(1000)), Ok(None));
    assert_eq!(n.ready(&a, 0, 0, 1049), Ready::Waits);
    assert_eq!(n.ready(&a, 0, 0, 1050), Ready::Woke(0), "timed out: no bits");
    assert_eq!(Clock { now: u64::MAX - 1, per_us: 0 }.deadline_in(u64::MAX), u64::MAX, "saturates; rate 0 is 1");
}

#[test]
fn sleep_parks_until_its_deadline() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    n.subscribe(&a, BELL, None).unwrap();
    // `sleep` is a wait for no bits.
    assert_eq!(n.wait(&a, 0, 0, Timeout::Micros(3), at(0)), Ok(None));
    rang(&mut n, &b, 0, 0, u64::MAX);
    assert_eq!(n.ready(&a, 0, 0, 29), Ready::Waits, "bits do not end a sleep");
    assert_eq!(n.ready(&a, 0, 0, 30), Ready::Woke(0));
    assert_eq!(take(&mut n, &a, 0), u64::MAX, "the bits stayed pending");
}

#[test]
fn an_interrupt_ends_a_wait() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    n.subscribe(&a, BELL, Some(99)).unwrap();
    assert_eq!(n.wait(&a, 0, 0b1000, Timeout::Forever, at(0)), Ok(None));
    rang(&mut n, &b, 0, 0, 0b1);
    assert_eq!(n.ready(&a, 0, 0, 0), Ready::Woke(0), "the vector ended it, not the bits");
    assert_eq!(n.before_run(0, 0, 0, || true), Entry::Inject(99));
}

#[test]
fn timer_fires_at_its_deadline_highest_vector_first() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    n.subscribe(&a, BELL, Some(200)).unwrap();
    n.subscribe(&a, OTHER, Some(100)).unwrap();
    n.subscribe(&b, OTHER, None).unwrap();
    assert_eq!(n.timer(&a, 0, 2, 40, at(0)), Ok(0));
    assert_eq!(n.timer_deadline(0, 0), Some(20));
    assert_eq!(n.before_run(0, 0, 19, || panic!("nothing pending: not asked")), Entry::Nothing);
    assert_eq!(n.notify(&b, 0, 0, OTHER, 1).map(|r| r.reached), Ok(1));
    rang(&mut n, &b, 0, 0, 1);
    assert_eq!(n.before_run(0, 0, 20, || false), Entry::Window, "IF=0: an interrupt window");
    assert_eq!(n.timer_deadline(0, 0), None, "fired once");
    let order: Vec<_> = (0..4).map(|_| n.before_run(0, 0, 20, || true)).collect();
    assert_eq!(order, [Entry::Inject(200), Entry::Inject(100), Entry::Inject(40), Entry::Nothing]);
    assert_eq!(n.injected(0), 3);
    // Cancelled with 0 microseconds.
    n.timer(&a, 0, 5, 33, at(100)).unwrap();
    n.timer(&a, 0, 0, 0, at(100)).unwrap();
    assert_eq!(n.before_run(0, 0, u64::MAX, || true), Entry::Nothing);
    // A vCPU whose events were never made is left alone.
    assert_eq!(n.before_run(7, 0, 0, || true), Entry::Leave);
}

#[test]
fn a_timer_ends_a_wait_forever() {
    let mut n = Notify::default();
    let a = guest(0, 1);
    n.timer(&a, 0, 1, 64, at(0)).unwrap();
    assert_eq!(n.wait(&a, 0, 1, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.ready(&a, 0, 0, 9), Ready::Waits);
    assert_eq!(n.ready(&a, 0, 0, 10), Ready::Woke(0));
    assert_eq!(n.before_run(0, 0, 10, || true), Entry::Inject(64));
}

#[test]
fn an_ended_vcpu_gets_nothing_and_counts_as_blocked() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 2), guest(1, 1));
    n.subscribe(&a, BELL, Some(50)).unwrap();
    place(&mut n, &a, 1, 0);
    n.timer(&a, 1, 1, 60, at(0)).unwrap();
    n.vcpu_ended(0, 1);
    assert_eq!(n.timer_deadline(0, 1), None, "its timer went with it");
    let rung = ring(&mut n, &b, 0, 0, 1).unwrap();
    assert_eq!((rung.reached, rung.kick), (1, Kick(0b10)), "only vCPU 0 (on CPU 1)");
    assert_eq!(n.stats().delivered, 1);
    assert_eq!(n.before_run(0, 1, 1000, || true), Entry::Nothing, "no vector raised in the ended vCPU");
    assert_eq!(n.before_run(0, 0, 1000, || true), Entry::Inject(50));
    // Its last live vCPU waits forever: deadlock.
    assert_eq!(n.wait(&a, 0, 0b10, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.idle_until([(0, 2)].into_iter(), 1, 0, 500), Idle::Deadlock);
    // Every vCPU of the only subscriber ended: nobody receives.
    n.vcpu_ended(0, 0);
    assert_eq!(ring(&mut n, &b, 0, 0, 1), Err(Refused::NoReceiver(name("bell"))));
}

#[test]
fn unmounting_ends_the_subscription() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    n.subscribe(&a, BELL, None).unwrap();
    n.subscribe(&a, BELL, Some(77)).unwrap();
    n.subscribe(&a, OTHER, None).unwrap();
    assert_eq!(ring(&mut n, &b, 0, 0, 1).unwrap().reached, 1);
    assert_eq!(n.stats().delivered, 1, "subscribing again changes the vector, adds no subscription");
    assert_eq!(n.before_run(0, 0, 0, || true), Entry::Inject(77));
    n.unmounted(0, &name("bell"));
    assert_eq!(ring(&mut n, &b, 0, 0, 1), Err(Refused::NoReceiver(name("bell"))));
    assert_eq!(n.notify(&b, 0, 0, OTHER, 1).unwrap().reached, 1, "its other subscription stays");
    n.unmounted(1, &name("other"));
    assert_eq!(n.notify(&b, 0, 0, OTHER, 1).unwrap().reached, 1, "another guest's unmount ends only its own");
}

#[test]
fn a_guest_ending_removes_its_subscriptions() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 2), guest(1, 1));
    let mut c = guest(2, 1);
    n.subscribe(&a, BELL, Some(40)).unwrap();
    place(&mut n, &a, 3, 0);
    n.watch(&a, 1, &name("later"), 0b1, false).unwrap();
    n.timer(&a, 0, 1, 41, at(0)).unwrap();
    assert_eq!(n.wait(&a, 1, 0b1, Timeout::Forever, at(0)), Ok(None));
    n.guest_ended(0);
    assert!(n.subs.iter().all(|s| s.guest != 0), "no subscription left behind (the table does not grow with ended guests)");
    assert_eq!(ring(&mut n, &b, 0, 0, 1), Err(Refused::NoReceiver(name("bell"))));
    assert_eq!(n.timer_deadline(0, 0), None);
    assert_eq!(n.injected(0), 0);
    c.mounts.push((0x30_0000, name("later")));
    let delivered = n.stats().delivered;
    assert_eq!(n.entered(&c, 0x30_0000, 0), Kick(0), "its watch went");
    assert_eq!((n.stats().delivered, n.stats().ipis), (delivered, 0));
    // Not live any more: it does not keep a live guest from idling.
    assert_eq!(n.idle_until([(1, 1)].into_iter(), 0, 0, 500), Idle::Until(500));
}

#[test]
fn every_vcpu_waiting_forever_with_no_timer_is_a_deadlock() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 2), guest(1, 1));
    place(&mut n, &a, 0, 0);
    place(&mut n, &b, 1, 0);
    for (g, v) in [(&a, 0), (&a, 1), (&b, 0)] {
        assert_eq!(n.wait(g, v, 1, Timeout::Forever, at(0)), Ok(None));
    }
    let live = [(0, 2), (1, 1)];
    assert_eq!(n.idle_until(live.into_iter(), 0, 0, 500), Idle::Deadlock);
    assert_eq!(n.idle_until(live.into_iter(), 1, 0, 500), Idle::Deadlock);
    assert_eq!(n.stats().halts, 0);
    // A guest not live (stopped) does not count either way.
    assert_eq!(n.idle_until([(0, 2)].into_iter(), 0, 0, 500), Idle::Deadlock);
}

#[test]
fn a_vcpu_with_a_timer_or_deadline_is_not_deadlocked() {
    let mut n = Notify::default();
    let (a, b) = (guest(0, 1), guest(1, 1));
    let live = [(0, 1), (1, 1)];
    place(&mut n, &a, 0, 0);
    place(&mut n, &b, 1, 0);
    assert_eq!(n.wait(&a, 0, 1, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.wait(&b, 0, 1, Timeout::Forever, at(0)), Ok(None));
    // `b` (CPU 1) has a timer: CPU 0 halts for at most a slice, CPU 1 until the timer.
    n.timer(&b, 0, 30, 40, at(0)).unwrap();
    assert_eq!(n.idle_until(live.into_iter(), 0, 0, 500), Idle::Until(500));
    assert_eq!(n.idle_until(live.into_iter(), 1, 0, 500), Idle::Until(300));
    assert_eq!(n.idle_until(live.into_iter(), 1, 0, 200), Idle::Until(200), "at most a slice");
    // A wait with a deadline instead.
    n.timer(&b, 0, 0, 0, at(0)).unwrap();
    assert_eq!(n.wait(&b, 0, 1, Timeout::Micros(10), at(0)), Ok(None));
    assert_eq!(n.idle_until(live.into_iter(), 0, 0, 500), Idle::Until(500));
    assert_eq!(n.idle_until(live.into_iter(), 1, 0, 500), Idle::Until(100));
    // The deadline passed after the scheduler looked: CPU 1 does not halt.
    assert_eq!(n.idle_until(live.into_iter(), 1, 100, 500), Idle::Until(100));
    assert_eq!(n.stats().halts, 5);
    // `b` ended: deadlock; a vCPU the scheduler never looked at is runnable.
    let c = guest(2, 2);
    place(&mut n, &c, 1, 0);
    n.vcpu_ended(1, 0);
    assert_eq!(n.idle_until([(0, 1), (1, 1)].into_iter(), 0, 0, 500), Idle::Deadlock);
    assert_eq!(n.wait(&c, 0, 1, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.wait(&c, 1, 1, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.idle_until([(0, 1), (2, 2)].into_iter(), 0, 0, 500), Idle::Deadlock);
    assert_eq!(n.idle_until([(0, 1), (2, 3)].into_iter(), 0, 0, 500), Idle::Until(500), "its vCPU 2 has no events yet");
}

#[test]
fn name_watch_fires_when_the_name_enters() {
    let mut n = Notify::default();
    let a = guest(0, 2);
    let mut b = guest(1, 1);
    place(&mut n, &a, 1, 0);
    assert_eq!(n.watch(&a, 0, &name("later"), 0b100, false), Ok(0));
    assert_eq!(n.watch(&a, 1, &name("later"), 0b1, false), Ok(0));
    assert_eq!(n.watch(&a, 1, &name("later"), 0, false), Ok(0), "0 cancels");
    assert_eq!(n.wait(&a, 0, 0b100, Timeout::Forever, at(0)), Ok(None));
    assert_eq!(n.entered(&b, 0x30_0000, 0), Kick(0), "nothing mounted there");
    b.mounts.push((0x40_0000, name("sooner")));
    assert_eq!(n.entered(&b, 0x40_0000, 0), Kick(0), "another name");
    b.mounts.push((0x30_0000, name("later")));
    assert_eq!(n.entered(&b, 0x30_0000, 0), Kick(0b10));
    assert_eq!(n.ready(&a, 0, 1, 0), Ready::Woke(0b100));
    assert_eq!(take(&mut n, &a, 1), 0, "the cancelled watch");
    assert_eq!(n.entered(&b, 0x30_0000, 0), Kick(0), "a watch fires once");
    assert_eq!(take(&mut n, &a, 0), 0);
    // Already in the directory: the bits at once.
    assert_eq!(n.watch(&a, 1, &name("later"), 0b1000, true), Ok(1));
    assert_eq!(take(&mut n, &a, 1), 0b1000);
}

#[test]
fn bad_arguments_get_the_errors_of_the_abi() {
    let mut n = Notify::default();
    let a = guest(0, 2);
    let nowhere = 0x1234_5000;
    assert_eq!(n.subscribe(&a, nowhere, None), Err(Refused::NotMounted(nowhere)));
    assert_eq!(n.notify(&a, 0, 0, nowhere, 1), Err(Refused::NotMounted(nowhere)));
    assert_eq!(n.notify(&a, 0, 0, BELL + 0x1000, 1), Err(Refused::NotMounted(BELL + 0x1000)), "inside a mount is not its address");
    assert_eq!(Refused::NotMounted(nowhere).error(), Error::NotFound);
    for v in [2, 3, u32::MAX] {
        assert_eq!(n.wait(&a, v, 1, Timeout::Forever, at(0)), Err(Refused::NoVcpu(v)));
        assert_eq!(n.timer(&a, v, 1, 40, at(0)), Err(Refused::NoVcpu(v)));
        assert_eq!(n.watch(&a, v, &name("x"), 1, false), Err(Refused::NoVcpu(v)));
    }
    assert_eq!(Refused::NoVcpu(2).error(), Error::Invalid);
    assert_eq!(Refused::NoMemory.error(), Error::NoMemory);
    assert_eq!(n.timer_deadline(0, 2), None);
    // Vectors, bits and timeouts are checked where the call is decoded, before any of this.
    let d = |nr, a: [u64; 6]| abi::Call::decode(nr, a);
    for v in [1, 31, 256, u64::MAX] {
        assert_eq!(d(abi::HC_NOTIFY_SUBSCRIBE, [BELL, v, 0, 0, 0, 0]), Err(Error::Invalid));
        assert_eq!(d(abi::HC_TIMER, [10, v, 0, 0, 0, 0]), Err(Error::Invalid));
    }
    assert_eq!(d(abi::HC_NOTIFY, [BELL, 0, 0, 0, 0, 0]), Err(Error::Invalid));
    assert_eq!(d(abi::HC_WAIT, [0, 0, 0, 0, 0, 0]), Err(Error::Invalid));
}

#[test]
fn refusals_read_as_reasons() {
    assert_eq!(alloc::format!("{}", Refused::NotMounted(0x2000)), "no morsel is mounted at 0x2000");
    assert_eq!(alloc::format!("{}", Refused::NoReceiver(name("bell"))), "nobody else subscribed to 'bell'");
}

#[test]
fn a_ring_names_the_guests_whose_vcpus_got_a_vector_raised() {
    let mut n = Notify::default();
    let (a, b, c, d) = (guest(0, 2), guest(2, 1), guest(65, 1), guest(3, 1));
    n.subscribe(&a, BELL, Some(40)).unwrap();
    n.subscribe(&b, BELL, None).unwrap();
    n.subscribe(&c, BELL, Some(41)).unwrap();
    // `d` rings: `a` and `c` get vectors (their slice starts must look), `b` bits only.
    let raised = ring(&mut n, &d, 0, 0, 1).unwrap().raised;
    assert!(raised.has(0) && raised.has(65), "{raised:?}");
    assert!(raised.has(1), "65 % 64: more guests named, never fewer");
    assert!(!raised.has(2) && !raised.has(3), "{raised:?}");
    // Still raised while pending (the start that injects it looks anyway): named again.
    assert!(ring(&mut n, &d, 0, 0, 1).unwrap().raised.has(0));
    // The caller's own other vCPU gets it: its own guest is named.
    let raised = ring(&mut n, &a, 0, 0, 1).unwrap().raised;
    assert!(raised.has(0), "{raised:?}");
    // `a` alone subscribed with a vector, and only the caller is in it: not named.
    let solo = (guest(7, 1), guest(8, 1));
    n.subscribe(&solo.0, OTHER, Some(42)).unwrap();
    n.subscribe(&solo.1, OTHER, None).unwrap();
    let raised = n.notify(&solo.0, 0, 0, OTHER, 1).unwrap().raised;
    assert!(!raised.has(7), "the caller's guest has no other vCPU: {raised:?}");
}
