//! Amounts and units.
//!
//! Lightning moves whole millisatoshis ([`Msat`], `u64`). Accruals are kept in nanosatoshis
//! ([`Nsat`], `u128`): 1 sat = 10^9 nsat, 1 msat = 10^6 nsat. All arithmetic is checked and
//! every conversion names its rounding.

use core::fmt;

/// Nanosatoshis in one millisatoshi.
pub const NSAT_PER_MSAT: u128 = 1_000_000;
/// Nanosatoshis in one satoshi.
pub const NSAT_PER_SAT: u128 = 1_000_000_000;

/// An amount arithmetic error. Amount code never wraps and never panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// The result does not fit the type.
    #[error("amount overflow")]
    Overflow,
    /// A subtraction would go below zero.
    #[error("amount underflow")]
    Underflow,
}

/// An amount in nanosatoshis (10^-9 sat): the unit of accrual.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Nsat(pub u128);

/// An amount in millisatoshis: the unit Lightning pays in.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Msat(pub u64);

impl Nsat {
    /// Zero nanosatoshis.
    pub const ZERO: Nsat = Nsat(0);

    /// `self + rhs`, or [`AmountError::Overflow`].
    pub fn checked_add(self, rhs: Nsat) -> Result<Nsat, AmountError> {
        self.0.checked_add(rhs.0).map(Nsat).ok_or(AmountError::Overflow)
    }

    /// `self - rhs`, or [`AmountError::Underflow`].
    pub fn checked_sub(self, rhs: Nsat) -> Result<Nsat, AmountError> {
        self.0.checked_sub(rhs.0).map(Nsat).ok_or(AmountError::Underflow)
    }

    /// `self * rhs`, or [`AmountError::Overflow`].
    pub fn checked_mul(self, rhs: u128) -> Result<Nsat, AmountError> {
        self.0.checked_mul(rhs).map(Nsat).ok_or(AmountError::Overflow)
    }

    /// Whole millisatoshis contained in this amount, **rounding down**; the sub-msat part is
    /// returned by [`Nsat::sub_msat_remainder`]. Errors if the msat count exceeds `u64`.
    pub fn floor_msat(self) -> Result<Msat, AmountError> {
        u64::try_from(self.0 / NSAT_PER_MSAT).map(Msat).map_err(|_| AmountError::Overflow)
    }

    /// Millisatoshis needed to cover this amount, **rounding up**.
    pub fn ceil_msat(self) -> Result<Msat, AmountError> {
        let whole = self.0 / NSAT_PER_MSAT + u128::from(self.0 % NSAT_PER_MSAT != 0);
        u64::try_from(whole).map(Msat).map_err(|_| AmountError::Overflow)
    }

    /// The part below one millisatoshi: `self mod 10^6`, always `< 10^6`.
    pub fn sub_msat_remainder(self) -> Nsat {
        Nsat(self.0 % NSAT_PER_MSAT)
    }

    /// Whether this is zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl Msat {
    /// Zero millisatoshis.
    pub const ZERO: Msat = Msat(0);

    /// `self + rhs`, or [`AmountError::Overflow`].
    pub fn checked_add(self, rhs: Msat) -> Result<Msat, AmountError> {
        self.0.checked_add(rhs.0).map(Msat).ok_or(AmountError::Overflow)
    }

    /// `self - rhs`, or [`AmountError::Underflow`].
    pub fn checked_sub(self, rhs: Msat) -> Result<Msat, AmountError> {
        self.0.checked_sub(rhs.0).map(Msat).ok_or(AmountError::Underflow)
    }

    /// The same amount in nanosatoshis (exact; `u64 * 10^6` always fits `u128`).
    pub fn to_nsat(self) -> Nsat {
        Nsat(u128::from(self.0) * NSAT_PER_MSAT)
    }

    /// Whether this is zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<Msat> for Nsat {
    fn from(m: Msat) -> Nsat {
        m.to_nsat()
    }
}

impl fmt::Debug for Nsat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}nsat", self.0)
    }
}

impl fmt::Display for Nsat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} nsat", self.0)
    }
}

impl fmt::Debug for Msat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}msat", self.0)
    }
}

impl fmt::Display for Msat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} msat", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msat_conversions_state_their_rounding() {
        let a = Nsat(2_999_999);
        assert_eq!(a.floor_msat(), Ok(Msat(2)));
        assert_eq!(a.ceil_msat(), Ok(Msat(3)));
        assert_eq!(a.sub_msat_remainder(), Nsat(999_999));
        assert_eq!(Nsat(3_000_000).ceil_msat(), Ok(Msat(3)));
        assert_eq!(Msat(u64::MAX).to_nsat().floor_msat(), Ok(Msat(u64::MAX)));
        assert_eq!(Nsat(u128::MAX).floor_msat(), Err(AmountError::Overflow));
        assert_eq!(Nsat(u128::MAX).ceil_msat(), Err(AmountError::Overflow));
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Nsat(u128::MAX).checked_add(Nsat(1)), Err(AmountError::Overflow));
        assert_eq!(Nsat(0).checked_sub(Nsat(1)), Err(AmountError::Underflow));
        assert_eq!(Msat(u64::MAX).checked_add(Msat(1)), Err(AmountError::Overflow));
        assert_eq!(Msat(1).checked_sub(Msat(2)), Err(AmountError::Underflow));
        assert_eq!(Nsat(u128::MAX).checked_mul(2), Err(AmountError::Overflow));
    }
}
