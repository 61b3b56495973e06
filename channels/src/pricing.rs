//! Pricing: a model's tariff turns usage into a price, and the contributor share turns the
//! price into the contributor pool.
//!
//! Rounding choice (applied everywhere): the pool is `floor(price * share_ppm / 10^6)` —
//! the sub-nsat fraction stays with the provider.

use crate::amount::{AmountError, Nsat};

/// Parts per million in one whole.
pub const PPM: u32 = 1_000_000;

/// A model's price list, in nanosatoshis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tariff {
    /// Flat price per request.
    pub per_request_nsat: Nsat,
    /// Price per input token.
    pub per_input_token_nsat: Nsat,
    /// Price per output token.
    pub per_output_token_nsat: Nsat,
}

/// What one request used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
}

/// Why a price or pool could not be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// Arithmetic overflow.
    #[error(transparent)]
    Amount(#[from] AmountError),
    /// `share_ppm > 1_000_000`.
    #[error("contributor share above 1,000,000 ppm")]
    ShareTooLarge,
    /// The tariff charges nothing at all.
    #[error("tariff is zero")]
    ZeroTariff,
}

impl Tariff {
    /// Checks the tariff charges something.
    pub fn validate(&self) -> Result<(), PricingError> {
        if self.per_request_nsat.is_zero()
            && self.per_input_token_nsat.is_zero()
            && self.per_output_token_nsat.is_zero()
        {
            return Err(PricingError::ZeroTariff);
        }
        Ok(())
    }

    /// `per_request + input_tokens * per_input + output_tokens * per_output`, checked.
    pub fn price(&self, usage: Usage) -> Result<Nsat, PricingError> {
        let input = self.per_input_token_nsat.checked_mul(u128::from(usage.input_tokens))?;
        let output = self.per_output_token_nsat.checked_mul(u128::from(usage.output_tokens))?;
        Ok(self.per_request_nsat.checked_add(input)?.checked_add(output)?)
    }
}

/// The contributor pool of a request: `floor(price * share_ppm / 10^6)`. Exact for every
/// `u128` price (computed as `a * ppm + floor(b * ppm / 10^6)` with `price = a * 10^6 + b`,
/// so no intermediate overflows).
pub fn contributor_pool(price: Nsat, share_ppm: u32) -> Result<Nsat, PricingError> {
    if share_ppm > PPM {
        return Err(PricingError::ShareTooLarge);
    }
    let (ppm, whole) = (u128::from(share_ppm), u128::from(PPM));
    let (a, b) = (price.0 / whole, price.0 % whole);
    Ok(Nsat(a * ppm + b * ppm / whole))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pool_rounds_down_and_never_overflows() {
        assert_eq!(contributor_pool(Nsat(999), 500_000), Ok(Nsat(499)));
        assert_eq!(contributor_pool(Nsat(u128::MAX), PPM), Ok(Nsat(u128::MAX)));
        assert_eq!(contributor_pool(Nsat(1), PPM + 1), Err(PricingError::ShareTooLarge));
    }

    #[test]
    fn price_is_checked() {
        let t = Tariff {
            per_request_nsat: Nsat(1),
            per_input_token_nsat: Nsat(u128::MAX),
            per_output_token_nsat: Nsat(0),
        };
        assert!(t.price(Usage { input_tokens: 2, output_tokens: 0 }).is_err());
        assert_eq!(Tariff::default().validate(), Err(PricingError::ZeroTariff));
    }

    proptest! {
        #[test]
        fn pool_equals_exact_floor(price in any::<u128>(), ppm in 0..=PPM) {
            let exact = ethnum::U256::from(price) * ethnum::U256::from(ppm) / ethnum::U256::from(PPM);
            prop_assert_eq!(contributor_pool(Nsat(price), ppm).map(|n| ethnum::U256::from(n.0)), Ok(exact));
        }
    }
}
