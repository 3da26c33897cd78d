//! The bookkeeping on one thread (debug and release): counters, merging, `Owed`'s room and
//! its overflow, the barrier.

use super::*;
use core::cell::{Cell, RefCell};

/// CPU `me` of `N`, recording what it sent and flushed; `answer` services its mailbox.
struct Fake<'a, const N: usize> {
    mb: &'a Mailboxes<N>,
    me: Cell<usize>,
    sent: RefCell<Vec<usize>>,
    flushed: RefCell<Vec<usize>>,
}

impl<'a, const N: usize> Fake<'a, N> {
    fn new(mb: &'a Mailboxes<N>, me: usize) -> Self {
        Fake { mb, me: Cell::new(me), sent: RefCell::new(Vec::new()), flushed: RefCell::new(Vec::new()) }
    }
}

impl<const N: usize> Cpus for Fake<'_, N> {
    fn me(&self) -> usize {
        self.me.get()
    }
    fn send(&self, cpu: usize) {
        self.sent.borrow_mut().push(cpu);
    }
    fn flush(&self, cpu: usize) {
        self.flushed.borrow_mut().push(cpu);
    }
    fn answer(&self) {
        self.mb.service(self.me.get(), self);
    }
}

#[test]
fn request_counts_and_service_acknowledges() {
    let mb = Mailboxes::<4>::new();
    let hw = Fake::new(&mb, 0);
    let (acks, sent) = mb.request(0b1111, &hw);
    assert_eq!(sent, 3, "no IPI to this CPU");
    assert_eq!(*acks.want(), [0, 1, 1, 1]);
    assert_eq!(*hw.sent.borrow(), [1, 2, 3]);
    assert_eq!(mb.flush_gen(0), 1, "the initiator flushes locally");
    let (acks2, _) = mb.request(0b0010, &hw);
    assert_eq!(*acks2.want(), [0, 2, 0, 0], "requests are counters");
    assert_eq!(*mb.outstanding().want(), [0, 2, 1, 1]);
    assert!(!mb.acknowledged(&acks));

    // CPU 1 answers both requests at once; CPU 2 and 3 not yet.
    assert!(mb.service(1, &hw));
    assert!(!mb.service(1, &hw), "nothing left to answer");
    assert_eq!(mb.flush_gen(1), 1, "one flush for both requests");
    assert!(mb.acknowledged(&acks2));
    assert!(!mb.acknowledged(&acks));
    assert_eq!(*mb.outstanding().want(), [0, 0, 1, 1]);
    mb.service(2, &hw);
    mb.service(3, &hw);
    assert!(mb.acknowledged(&acks));
    assert!(mb.outstanding().is_empty());
    assert!(!mb.barrier(&hw), "nothing outstanding: no wait");
    assert_eq!(*hw.flushed.borrow(), [0, 0, 1, 2, 3], "every flush before its acknowledgment");
}

#[test]
fn acks_merge_keeps_the_largest() {
    let mut a = Acks::<3>::of([0, 5, 2]);
    assert!(!a.is_empty());
    assert_eq!(a.cpus(), 0b110);
    a.merge(&Acks::of([1, 3, 0]));
    assert_eq!(*a.want(), [1, 5, 2]);
    assert_eq!(a.cpus(), 0b111, "the set follows the numbers");
    assert_eq!(a, Acks::of([1, 5, 2]));
    a.clear();
    assert_eq!(a, Acks::NONE, "cleared: nothing awaited, every number 0");
    assert!(Acks::<3>::NONE.is_empty());
}

#[test]
fn mask_bits_past_n_are_ignored() {
    let mb = Mailboxes::<2>::new();
    let hw = Fake::new(&mb, 1);
    let (acks, sent) = mb.request(u64::MAX, &hw);
    assert_eq!((*acks.want(), sent), ([1, 0], 1));
}

#[test]
fn own_requests_answered_while_waiting() {
    // CPU 0 waits for itself (a request another CPU made of it counts the same): `wait`
    // answers through `Cpus::answer`, so it ends.
    let mb = Mailboxes::<2>::new();
    let hw1 = Fake::new(&mb, 1);
    let (acks, _) = mb.request(0b01, &hw1);
    let hw0 = Fake::new(&mb, 0);
    mb.wait(&acks, &hw0);
    assert!(mb.acknowledged(&acks));
    assert!(mb.outstanding().is_empty());
}

#[test]
fn owed_keeps_until_settled() {
    let mb = Mailboxes::<2>::new();
    let hw = Fake::new(&mb, 0);
    let mut o = Owed::<2>::new();
    o.reserve(4);
    assert!(o.is_empty());
    let mut freed = Vec::new();
    assert_eq!(o.keep(0x1000, &mb, &hw, 0b11, |f| freed.push(f)), Kept::Deferred);
    assert_eq!(o.keep(0x2000 | 9, &mb, &hw, 0b11, |f| freed.push(f)), Kept::Deferred);
    let (acks, _) = mb.request(0b10, &hw);
    o.owe(&acks);
    assert_eq!(o.kept(), 2);
    assert_eq!(*o.acks().want(), [0, 1]);
    assert!(freed.is_empty(), "nothing freed before settle");
    mb.service(1, &hw);
    o.settle(&mb, &hw, |f| freed.push(f));
    assert_eq!(freed, [0x1000, 0x2000 | 9]);
    assert!(o.is_empty());
}

#[test]
fn owed_overflow_waits_at_once() {
    let mb = Mailboxes::<2>::new();
    // CPU 1 acknowledges whenever CPU 0 waits: a fake that answers for both.
    struct Both<'a>(Fake<'a, 2>);
    impl Cpus for Both<'_> {
        fn me(&self) -> usize {
            self.0.me()
        }
        fn send(&self, cpu: usize) {
            self.0.send(cpu)
        }
        fn flush(&self, cpu: usize) {
            self.0.flush(cpu)
        }
        fn answer(&self) {
            self.0.mb.service(0, &self.0);
            self.0.mb.service(1, &self.0);
        }
    }
    let hw = Both(Fake::new(&mb, 0));
    let mut o = Owed::<2>::new();
    o.reserve(2);
    let cap = o.frames.capacity();
    let mut freed = Vec::new();
    for i in 0..cap as u64 {
        assert_eq!(o.keep(i << 12, &mb, &hw, 0b11, |f| freed.push(f)), Kept::Deferred);
    }
    assert!(hw.0.sent.borrow().is_empty(), "no shootdown while there is room");
    assert_eq!(o.keep(0xf000, &mb, &hw, 0b11, |f| freed.push(f)), Kept::Overflow);
    assert_eq!(*hw.0.sent.borrow(), [1], "the overflow shoots down on every CPU of `all`");
    assert!(mb.outstanding().is_empty(), "and waited for it");
    assert_eq!(freed.len(), cap + 1, "everything kept and the new frame went back");
    assert_eq!(freed.last(), Some(&0xf000));
    assert!(o.is_empty());
    assert_eq!(o.frames.capacity(), cap, "the room is kept, never grown");
}

#[test]
fn owed_without_room_waits_every_time() {
    let mb = Mailboxes::<1>::new();
    let hw = Fake::new(&mb, 0);
    let mut o = Owed::<1>::new();
    let mut freed = Vec::new();
    assert_eq!(o.keep(0x3000, &mb, &hw, 0b1, |f| freed.push(f)), Kept::Overflow);
    assert_eq!(freed, [0x3000]);
    assert_eq!(mb.flush_gen(0), 1);
}

#[test]
fn request_visits_only_the_cpus_named() {
    let mb = Mailboxes::<64>::new();
    let hw = Fake::new(&mb, 5);
    let (acks, sent) = mb.request(1 << 5 | 1 << 40 | 1 << 63, &hw);
    assert_eq!(sent, 2);
    assert_eq!(*hw.sent.borrow(), [40, 63]);
    assert_eq!(acks.cpus(), 1 << 40 | 1 << 63);
    assert_eq!((acks.want()[40], acks.want()[63], acks.want()[5]), (1, 1, 0));
}

#[test]
fn request_of_this_cpu_alone_touches_no_mailbox() {
    let mb = Mailboxes::<4>::new();
    let hw = Fake::new(&mb, 2);
    let mut o = Owed::<4>::new();
    assert_eq!(o.request(&mb, &hw, 0b100), 0);
    assert!(o.acks().is_empty(), "nothing to wait for");
    assert!(hw.sent.borrow().is_empty());
    assert!(mb.outstanding().is_empty(), "no request made of any mailbox");
    assert_eq!(mb.flush_gen(2), 1, "but this CPU flushes");
    assert_eq!(*hw.flushed.borrow(), [2]);
    // With another CPU named, its acknowledgment is owed and awaited by `settle`.
    assert_eq!(o.request(&mb, &hw, 0b101), 1);
    assert_eq!(o.acks().cpus(), 0b001);
    mb.service(0, &hw);
    o.settle(&mb, &hw, |_| {});
    assert!(o.is_empty());
}

#[test]
fn a_busy_cpu_gets_no_ipi_and_answers_when_it_is_ready_to_enter() {
    let mb = Mailboxes::<4>::new();
    let hw = Fake::new(&mb, 0);
    mb.busy(1);
    let (acks, sent) = mb.request(0b0110, &hw);
    assert_eq!(sent, 1, "no IPI to the busy CPU 1");
    assert_eq!(*hw.sent.borrow(), [2]);
    assert_eq!(*acks.want(), [0, 1, 1, 0], "CPU 1's acknowledgment is still awaited");
    assert!(!mb.acknowledged(&acks));
    // CPU 1 about to enter its guest (or halt): it answers, and its mark is gone.
    let hw1 = Fake::new(&mb, 1);
    assert!(mb.ready(1, &hw1), "the request made while it was busy is answered");
    assert_eq!(mb.flush_gen(1), 1);
    mb.service(2, &hw);
    assert!(mb.acknowledged(&acks));
    let (_, sent) = mb.request(0b0010, &hw);
    assert_eq!(sent, 1, "ready again: the next request sends the IPI");
    assert_eq!(*hw.sent.borrow(), [2, 1]);
}
