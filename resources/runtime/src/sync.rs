//! Poison-tolerant locking: a lock whose holder panicked is taken anyway
//! (see the crate doc for why that is sound here).

use std::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
    WaitTimeoutResult,
};
use std::time::Duration;

/// [`Mutex`] without poisoning.
pub trait MutexExt<T: ?Sized> {
    /// Locks, ignoring poisoning.
    fn locked(&self) -> MutexGuard<'_, T>;
    /// Locks if free, ignoring poisoning; `None` when another thread holds it.
    fn try_locked(&self) -> Option<MutexGuard<'_, T>>;
    /// The value of an exclusively borrowed mutex, ignoring poisoning.
    fn get_mut_unpoisoned(&mut self) -> &mut T;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_locked(&self) -> Option<MutexGuard<'_, T>> {
        match self.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn get_mut_unpoisoned(&mut self) -> &mut T {
        self.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}

/// [`RwLock`] without poisoning.
pub trait RwLockExt<T: ?Sized> {
    /// Shared lock, ignoring poisoning.
    fn read_locked(&self) -> RwLockReadGuard<'_, T>;
    /// Exclusive lock, ignoring poisoning.
    fn write_locked(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_locked(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_locked(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// [`Condvar`] waits without poisoning.
pub trait CondvarExt {
    /// Waits for a notification, ignoring poisoning.
    fn wait_locked<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;
    /// Waits for a notification or `timeout`, ignoring poisoning.
    fn wait_timeout_locked<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_locked<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    fn wait_timeout_locked<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, timeout)
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn poisoned_mutex() -> Arc<Mutex<u32>> {
        let m = Arc::new(Mutex::new(7));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        m
    }

    #[test]
    fn a_poisoned_mutex_is_still_locked_and_keeps_its_value() {
        let m = poisoned_mutex();
        *m.locked() += 1;
        assert_eq!(*m.locked(), 8);
        assert_eq!(m.try_locked().map(|g| *g), Some(8));
    }

    #[test]
    fn try_locked_is_none_while_another_guard_is_held() {
        let m = Mutex::new(1);
        let _g = m.locked();
        assert!(m.try_locked().is_none());
    }

    #[test]
    fn a_poisoned_rwlock_reads_and_writes() {
        let l = Arc::new(RwLock::new(1));
        let l2 = Arc::clone(&l);
        let _ = std::thread::spawn(move || {
            let _g = l2.write().unwrap();
            panic!("poison it");
        })
        .join();
        *l.write_locked() = 5;
        assert_eq!(*l.read_locked(), 5);
    }

    #[test]
    fn wait_timeout_locked_returns_the_guard_after_the_timeout() {
        let m = Mutex::new(3);
        let c = Condvar::new();
        let (g, r) = c.wait_timeout_locked(m.locked(), Duration::from_millis(5));
        assert!(r.timed_out());
        assert_eq!(*g, 3);
    }
}
