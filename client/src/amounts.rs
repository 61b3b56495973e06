//! Amounts for people: nanosatoshis shown as msat with six decimals, thousands grouped.

/// `nsat` as msat with six decimals and grouped thousands: `1,234.567890`.
pub fn msat_decimal(nsat: u128) -> String {
    format!("{}.{:06}", grouped(nsat / 1_000_000), nsat % 1_000_000)
}

/// `n` with a comma between each group of three digits: `1,234,567`.
pub fn grouped(n: u128) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_decimals() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(12_345_678), "12,345,678");
        assert_eq!(msat_decimal(0), "0.000000");
        assert_eq!(msat_decimal(1_234_567_890_123), "1,234,567.890123");
    }
}
