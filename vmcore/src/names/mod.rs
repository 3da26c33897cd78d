//! Names of shared objects (morsels, ExMap regions) and the one protocol every creator goes
//! through: [`Names::reserve`] a name (refused if it exists *or* is reserved, charged to the
//! owner's quota), build the object (possibly with the caller's lock let go), then
//! [`Names::commit`] it or [`Names::abort`]. Nothing can insert a name another way, and a
//! commit fills only its own reservation: an entry is never replaced.
//!
//! # Bounds
//! The table is sized once, at [`Names::try_new`], for the sum of what the quotas allow:
//! `owners * quota + system` entries ([`Limits`]), every byte allocated there (fallibly).
//! After that no operation allocates: a reservation within its owner's quota always finds
//! room, so owners that fill their quotas cannot deny service to another owner. Slots live
//! in chunks of [`CHUNK`] (no single allocation grows with the capacity beyond the index of
//! 4-byte slot numbers), the index is a hash table over the slot numbers with room for twice
//! the capacity (so its tombstones are cleared by rehashing in place, never by growing), and
//! names are hashed with SipHash keyed by the caller's seed (a guest cannot pick names that
//! collide without knowing it).
//!
//! # States of a name
//! absent -> `reserve` -> Reserved{owner} -> `commit` -> Named{owner, value} -> `remove` ->
//! absent; Reserved -> `abort` -> absent. Lookups ([`Names::get`]) see only Named entries (a
//! reserved name is "not found" to `open`, "taken" to every creator). A [`Ticket`] is neither
//! `Clone` nor `Copy`: each reservation is committed or aborted once.
//!
//! Concurrency: the table is plain data behind the caller's lock; the protocol (reserve in
//! one critical section, commit in a later one) is model-checked in `loom_tests.rs` against
//! creates, ExMap creates, opens and destroys of two owners.

use alloc::vec::Vec;
use core::fmt;
use hashbrown::HashTable;

#[cfg(all(test, loom))]
mod loom_tests;
#[cfg(all(test, not(loom)))]
mod tests;

/// Longest name in bytes.
pub const NAME_MAX: usize = 32;

/// Slots per chunk of the slot storage.
pub const CHUNK: usize = 64;

/// Who holds a name: a guest id below [`Limits::owners`], or [`SYSTEM`].
pub type Owner = u32;

/// The owner of names no guest holds (persistent morsels restored after a reboot); charged
/// to [`Limits::system`].
pub const SYSTEM: Owner = u32::MAX;

/// A name: 1 to [`NAME_MAX`] printable ASCII bytes without spaces (names appear in logs and in
/// other guests' calls). `Copy`, no heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    len: u8,
    bytes: [u8; NAME_MAX],
}

/// A name that is empty, too long or not printable ASCII.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadName;

impl Name {
    /// Checks and copies `bytes`.
    pub fn new(bytes: &[u8]) -> Result<Name, BadName> {
        if bytes.is_empty() || bytes.len() > NAME_MAX || !bytes.iter().all(u8::is_ascii_graphic) {
            return Err(BadName);
        }
        let mut n = Name { len: bytes.len() as u8, bytes: [0; NAME_MAX] };
        n.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(n)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn as_str(&self) -> &str {
        // Printable ASCII (checked in `new`) is UTF-8.
        core::str::from_utf8(self.as_bytes()).unwrap_or("")
    }
}

impl core::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Why a call on the table was refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The name exists or is reserved (the ABI's `Busy`).
    Taken,
    /// The owner holds its quota of names, reserved and committed together (`NoMemory`).
    Quota,
    /// The owner has no budget in this table (an id at or above [`Limits::owners`]).
    NoOwner,
    /// No free slot. Unreachable while the quotas hold (the table is sized for their sum);
    /// kept as a value instead of a panic.
    Full,
    /// A ticket that does not match its slot: a caller's bug, refused instead of replacing.
    Stale,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Error::Taken => "the name is taken or reserved",
            Error::Quota => "the owner holds its quota of names",
            Error::NoOwner => "the owner has no quota here",
            Error::Full => "the name table is full",
            Error::Stale => "the reservation does not match its slot",
        })
    }
}

/// The heap refused the table's memory at `try_new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

/// What the table is sized for: `owners` owners (ids `0..owners`) with `quota` names each,
/// plus `system` names of [`SYSTEM`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub owners: u32,
    pub quota: u32,
    pub system: u32,
}

impl Limits {
    /// The sum of what the quotas allow (None if it overflows `u32`).
    pub fn capacity(&self) -> Option<u32> {
        self.owners.checked_mul(self.quota)?.checked_add(self.system)
    }
}

/// Names an owner holds: `held` counts its reserved and committed names together (the quota
/// applies to it), `reserved` the reservations alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub held: u32,
    pub reserved: u32,
}

/// Where a committed name is in the table ([`Names::slot`]), for [`Names::get_mut_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotId(u32);

impl SlotId {
    /// The slot's number, below [`Names::capacity`]: an index for tables kept beside the
    /// names, one entry per slot.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A reservation: consumed by [`Names::commit`] or [`Names::abort`].
#[must_use = "a reservation holds its name and a quota unit until committed or aborted"]
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket {
    slot: u32,
    gen: u32,
    name: Name,
    owner: Owner,
}

impl Ticket {
    pub fn name(&self) -> &Name {
        &self.name
    }
    pub fn owner(&self) -> Owner {
        self.owner
    }
    /// The slot the name will be committed in ([`Names::commit`] keeps it there).
    pub fn slot(&self) -> SlotId {
        SlotId(self.slot)
    }
}

/// A committed name as lookups see it.
pub struct Entry<'a, T> {
    pub name: &'a Name,
    pub owner: Owner,
    pub value: &'a T,
}

enum Slot<T> {
    Free { next: u32 },
    Reserved { name: Name, owner: Owner, gen: u32 },
    Named { name: Name, owner: Owner, value: T },
}

impl<T> Slot<T> {
    fn name(&self) -> Option<&Name> {
        match self {
            Slot::Free { .. } => None,
            Slot::Reserved { name, .. } | Slot::Named { name, .. } => Some(name),
        }
    }
}

/// The keys of a table's name hash ([`Names::keys`]): fixed at `try_new`, so a copy can hash
/// a name with no lock held ([`Keys::hash`]), for the table to use under its lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys(u64, u64);

impl Keys {
    /// The keys of a table made with `seed` ([`Names::try_new`]).
    pub fn of(seed: [u64; 2]) -> Keys {
        Keys(seed[0], seed[1])
    }

    /// `name` with its SipHash under these keys (the table's costly step, done here).
    pub fn hash(self, name: Name) -> Hashed {
        Hashed { name, hash: hash((self.0, self.1), name.as_bytes()), keys: self }
    }
}

/// A name with its hash under [`Keys`]; a table with other keys hashes it again (never a
/// wrong look-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hashed {
    name: Name,
    hash: u64,
    keys: Keys,
}

impl Hashed {
    pub fn name(&self) -> &Name {
        &self.name
    }
}

/// End of the free list.
const NONE: u32 = u32::MAX;

/// The name table (see the module doc).
pub struct Names<T> {
    chunks: Vec<Vec<Slot<T>>>,
    /// Head of the free list through `Slot::Free::next`.
    free: u32,
    /// Slot numbers of every reserved or committed name, by the hash of the name.
    index: HashTable<u32>,
    counts: Vec<Count>,
    system: Count,
    limits: Limits,
    keys: (u64, u64),
    gen: u32,
    named: usize,
    reserved: usize,
}

/// SipHash 2-4 of `bytes` under `keys`.
fn hash(keys: (u64, u64), bytes: &[u8]) -> u64 {
    #[allow(deprecated)] // core's SipHasher is deprecated for std's HashMap use only; it is SipHash 2-4
    let mut h = core::hash::SipHasher::new_with_keys(keys.0, keys.1);
    core::hash::Hasher::write(&mut h, bytes);
    core::hash::Hasher::finish(&h)
}

fn slot_of<T>(chunks: &[Vec<Slot<T>>], i: u32) -> Option<&Slot<T>> {
    chunks.get(i as usize / CHUNK)?.get(i as usize % CHUNK)
}

fn slot_mut<T>(chunks: &mut [Vec<Slot<T>>], i: u32) -> Option<&mut Slot<T>> {
    chunks.get_mut(i as usize / CHUNK)?.get_mut(i as usize % CHUNK)
}

impl<T> Names<T> {
    /// A table for `limits`, its whole memory allocated now; `seed` keys the name hash.
    pub fn try_new(limits: Limits, seed: [u64; 2]) -> Result<Self, NoMemory> {
        let capacity = limits.capacity().filter(|&c| c < NONE).ok_or(NoMemory)? as usize;
        let mut chunks: Vec<Vec<Slot<T>>> = Vec::new();
        chunks.try_reserve_exact(capacity.div_ceil(CHUNK)).map_err(|_| NoMemory)?;
        for c in 0..capacity.div_ceil(CHUNK) {
            let n = CHUNK.min(capacity - c * CHUNK);
            let mut chunk = Vec::new();
            chunk.try_reserve_exact(n).map_err(|_| NoMemory)?;
            for k in 0..n {
                let i = c * CHUNK + k;
                chunk.push(Slot::Free { next: if i + 1 < capacity { i as u32 + 1 } else { NONE } });
            }
            chunks.push(chunk);
        }
        let mut index = HashTable::new();
        let keys = (seed[0], seed[1]);
        // Twice the capacity: at most half full, so tombstones go by rehashing in place.
        index.try_reserve(capacity * 2, |_: &u32| 0).map_err(|_| NoMemory)?;
        let mut counts = Vec::new();
        counts.try_reserve_exact(limits.owners as usize).map_err(|_| NoMemory)?;
        counts.resize(limits.owners as usize, Count::default());
        Ok(Names { chunks, free: if capacity > 0 { 0 } else { NONE }, index, counts, system: Count::default(), limits, keys, gen: 0, named: 0, reserved: 0 })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Names the table can hold at once (the sum of the quotas).
    pub fn capacity(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Committed names.
    pub fn len(&self) -> usize {
        self.named
    }

    pub fn is_empty(&self) -> bool {
        self.named == 0
    }

    /// Reservations not yet committed or aborted.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// What `owner` holds (zero for an owner without budget).
    pub fn count(&self, owner: Owner) -> Count {
        match owner {
            SYSTEM => self.system,
            o => self.counts.get(o as usize).copied().unwrap_or_default(),
        }
    }

    /// Bytes the table holds on the heap (fixed after `try_new`).
    pub fn heap_bytes(&self) -> usize {
        self.chunks.capacity() * core::mem::size_of::<Vec<Slot<T>>>()
            + self.chunks.iter().map(|c| c.capacity() * core::mem::size_of::<Slot<T>>()).sum::<usize>()
            + self.index.allocation_size()
            + self.counts.capacity() * core::mem::size_of::<Count>()
    }

    fn budget(&mut self, owner: Owner) -> Option<(&mut Count, u32)> {
        match owner {
            SYSTEM => Some((&mut self.system, self.limits.system)),
            o => self.counts.get_mut(o as usize).map(|c| (c, self.limits.quota)),
        }
    }

    /// The keys of this table's name hash, for [`Keys::hash`] with no lock held.
    pub fn keys(&self) -> Keys {
        Keys(self.keys.0, self.keys.1)
    }

    /// The hash of `h`'s name under this table's keys: `h`'s own if it was hashed with them.
    fn hash_of(&self, h: &Hashed) -> u64 {
        if h.keys == self.keys() {
            h.hash
        } else {
            hash(self.keys, h.name.as_bytes())
        }
    }

    /// The slot of `name` (reserved or committed).
    fn find(&self, name: &[u8]) -> Option<u32> {
        self.find_hashed(hash(self.keys, name), name)
    }

    /// `find` with the name's hash `h` already computed.
    fn find_hashed(&self, h: u64, name: &[u8]) -> Option<u32> {
        let chunks = &self.chunks;
        self.index.find(h, |&i| slot_of(chunks, i).and_then(Slot::name).is_some_and(|n| n.as_bytes() == name)).copied()
    }

    /// Reserves `name` for `owner`: `Taken` if the name is reserved or committed (by anyone),
    /// `NoOwner` / `Quota` if the owner has no room, charged to the owner's quota otherwise.
    pub fn reserve(&mut self, name: Name, owner: Owner) -> Result<Ticket, Error> {
        let h = self.keys().hash(name);
        self.reserve_hashed(&h, owner)
    }

    /// `reserve` of a name hashed already ([`Keys::hash`]).
    pub fn reserve_hashed(&mut self, hashed: &Hashed, owner: Owner) -> Result<Ticket, Error> {
        let (name, h) = (hashed.name, self.hash_of(hashed));
        if self.find_hashed(h, name.as_bytes()).is_some() {
            return Err(Error::Taken);
        }
        let (count, quota) = self.budget(owner).ok_or(Error::NoOwner)?;
        if count.held >= quota {
            return Err(Error::Quota);
        }
        let slot = self.free;
        let Some(Slot::Free { next }) = slot_of(&self.chunks, slot) else { return Err(Error::Full) };
        let next = *next;
        let (chunks, keys) = (&self.chunks, self.keys);
        // Never allocates: at most half of the buckets reserved at `try_new` are in use, so a
        // full tombstone count is cleared by rehashing in place.
        self.index
            .try_reserve(1, |&i| slot_of(chunks, i).and_then(Slot::name).map_or(0, |n| hash(keys, n.as_bytes())))
            .map_err(|_| Error::Full)?;
        self.gen = self.gen.wrapping_add(1);
        let gen = self.gen;
        if let Some(s) = slot_mut(&mut self.chunks, slot) {
            *s = Slot::Reserved { name, owner, gen };
        }
        self.free = next;
        let (chunks, keys) = (&self.chunks, self.keys);
        self.index.insert_unique(h, slot, |&i| slot_of(chunks, i).and_then(Slot::name).map_or(0, |n| hash(keys, n.as_bytes())));
        if let Some((count, _)) = self.budget(owner) {
            count.held += 1;
            count.reserved += 1;
        }
        self.reserved += 1;
        Ok(Ticket { slot, gen, name, owner })
    }

    /// Fills the reservation `t` with `value`: the name is now found by `get`. `Stale` (and
    /// `value` back) if the slot is not exactly that reservation; an entry is never replaced.
    pub fn commit(&mut self, t: Ticket, value: T) -> Result<(), (Error, T)> {
        match slot_of(&self.chunks, t.slot) {
            Some(Slot::Reserved { name, owner, gen }) if *name == t.name && *owner == t.owner && *gen == t.gen => {}
            _ => {
                debug_assert!(false, "commit of a stale reservation of {:?}", t.name);
                return Err((Error::Stale, value));
            }
        }
        if let Some(s) = slot_mut(&mut self.chunks, t.slot) {
            *s = Slot::Named { name: t.name, owner: t.owner, value };
        }
        self.reserved -= 1;
        self.named += 1;
        if let Some((count, _)) = self.budget(t.owner) {
            count.reserved -= 1;
        }
        Ok(())
    }

    /// Gives the reservation `t` up: the name is free again and the owner's quota unit back.
    pub fn abort(&mut self, t: Ticket) {
        match slot_of(&self.chunks, t.slot) {
            Some(Slot::Reserved { name, owner, gen }) if *name == t.name && *owner == t.owner && *gen == t.gen => {}
            _ => {
                debug_assert!(false, "abort of a stale reservation of {:?}", t.name);
                return;
            }
        }
        self.release(t.slot, hash(self.keys, t.name.as_bytes()), t.owner);
        self.reserved -= 1;
        if let Some((count, _)) = self.budget(t.owner) {
            count.reserved -= 1;
        }
    }

    /// Takes `slot` (holding the name whose hash is `h`) out of the index and onto the free
    /// list; one quota unit of `owner` back.
    fn release(&mut self, slot: u32, h: u64, owner: Owner) -> Option<Slot<T>> {
        if let Ok(e) = self.index.find_entry(h, |&i| i == slot) {
            e.remove();
        }
        let old = slot_mut(&mut self.chunks, slot).map(|s| core::mem::replace(s, Slot::Free { next: self.free }));
        self.free = slot;
        if let Some((count, _)) = self.budget(owner) {
            count.held -= 1;
        }
        old
    }

    /// The committed name `name` (a reserved one is not found).
    pub fn get(&self, name: &str) -> Option<Entry<'_, T>> {
        self.entry_at(self.find(name.as_bytes())?)
    }

    /// `get` of a name hashed already ([`Keys::hash`], perhaps with no lock held).
    pub fn get_hashed(&self, name: &Hashed) -> Option<Entry<'_, T>> {
        self.entry_at(self.find_hashed(self.hash_of(name), name.name.as_bytes())?)
    }

    /// The committed entry in slot `i`.
    fn entry_at(&self, i: u32) -> Option<Entry<'_, T>> {
        match slot_of(&self.chunks, i)? {
            Slot::Named { name, owner, value } => Some(Entry { name, owner: *owner, value }),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut T> {
        let i = self.find(name.as_bytes())?;
        match slot_mut(&mut self.chunks, i)? {
            Slot::Named { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Where the committed name `name` is now, for `get_mut_at`: the hash (SipHash, the
    /// table's one costly step) once per operation instead of once per look-up.
    pub fn slot(&self, name: &str) -> Option<SlotId> {
        let i = self.find(name.as_bytes())?;
        matches!(slot_of(&self.chunks, i)?, Slot::Named { .. }).then_some(SlotId(i))
    }

    /// `slot` of a name hashed already ([`Keys::hash`], perhaps with no lock held).
    pub fn slot_hashed(&self, name: &Hashed) -> Option<SlotId> {
        let i = self.find_hashed(self.hash_of(name), name.name.as_bytes())?;
        matches!(slot_of(&self.chunks, i)?, Slot::Named { .. }).then_some(SlotId(i))
    }

    /// The value of `name` at `at` (from `slot`), without hashing: None unless that slot
    /// still holds `name`, committed (a slot is reused once its name is removed).
    pub fn get_mut_at(&mut self, at: SlotId, name: &Name) -> Option<&mut T> {
        match slot_mut(&mut self.chunks, at.0)? {
            // Whole `Name`s (fixed size, zero-padded): compared without a call to `bcmp`.
            Slot::Named { name: held, value, .. } if held == name => Some(value),
            _ => None,
        }
    }

    /// Whether `name` is reserved and not yet committed.
    pub fn is_reserved(&self, name: &str) -> bool {
        self.find(name.as_bytes()).and_then(|i| slot_of(&self.chunks, i)).is_some_and(|s| matches!(s, Slot::Reserved { .. }))
    }

    /// Takes the committed name `name` out (a reservation stays: only `abort` ends it).
    /// The name is hashed once (SipHash, the costly step), for the look-up and the release.
    pub fn remove(&mut self, name: &str) -> Option<(Name, Owner, T)> {
        self.remove_with(hash(self.keys, name.as_bytes()), name.as_bytes())
    }

    /// `remove` of a name hashed already ([`Keys::hash`], perhaps with no lock held).
    pub fn remove_hashed(&mut self, name: &Hashed) -> Option<(Name, Owner, T)> {
        self.remove_with(self.hash_of(name), name.name.as_bytes())
    }

    /// `remove` of `name`, whose hash is `h`.
    fn remove_with(&mut self, h: u64, name: &[u8]) -> Option<(Name, Owner, T)> {
        let i = self.find_hashed(h, name)?;
        let owner = match slot_of(&self.chunks, i)? {
            Slot::Named { owner, .. } => *owner,
            _ => return None,
        };
        match self.release(i, h, owner) {
            Some(Slot::Named { name, owner, value }) => {
                self.named -= 1;
                Some((name, owner, value))
            }
            _ => None,
        }
    }

    /// Every committed name.
    pub fn iter(&self) -> impl Iterator<Item = Entry<'_, T>> {
        self.chunks.iter().flatten().filter_map(|s| match s {
            Slot::Named { name, owner, value } => Some(Entry { name, owner: *owner, value }),
            _ => None,
        })
    }

    /// Some committed name (to take the entries out one by one).
    pub fn first(&self) -> Option<Name> {
        self.iter().next().map(|e| *e.name)
    }
}
