//! The built-in task: free-text device commands -> one compact command line a microcontroller
//! can parse, e.g. `set the kitchen heater to 21.5 degrees at 7pm` -> `heater kitchen set 21.5C
//! 19:00`. Answers are checked by exact match, so the canonical form is strict:
//!
//! `<device> <place> <action> [<value>] [<HH:MM>]`, with values `21.5C` / `70F` (temperature),
//! `40%` (level), `3` (fan speed), `15min` (duration).
//!
//! Generation is deterministic from a seed. Phrasing, synonyms, number spelling, units, word
//! order and typos vary. The split is by (device, place) pair: the test split only holds pairs
//! that never occur in training or validation, so its score measures generalisation.

use std::collections::BTreeSet;

use super::Example;
use crate::rng::Rng;

/// The instruction every example carries.
pub const INSTRUCTION: &str = "Turn the request into a device command.";

/// Places commands refer to (the canonical word first, then spoken variants).
const PLACES: &[&[&str]] = &[
    &["kitchen", "kitchen"],
    &["bedroom", "bedroom", "sleeping room"],
    &["bathroom", "bathroom", "washroom"],
    &["hallway", "hallway", "hall", "corridor"],
    &["garage", "garage"],
    &["office", "office", "study"],
    &["attic", "attic", "loft"],
    &["basement", "basement", "cellar"],
    &["porch", "porch", "front porch"],
    &["livingroom", "living room", "lounge"],
    &["nursery", "nursery", "baby room"],
    &["garden", "garden", "yard", "backyard"],
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Device {
    Heater,
    Light,
    Blinds,
    Lock,
    Fan,
    Sprinkler,
}

const DEVICES: [Device; 6] =
    [Device::Heater, Device::Light, Device::Blinds, Device::Lock, Device::Fan, Device::Sprinkler];

impl Device {
    fn canonical(self) -> &'static str {
        match self {
            Device::Heater => "heater",
            Device::Light => "light",
            Device::Blinds => "blinds",
            Device::Lock => "lock",
            Device::Fan => "fan",
            Device::Sprinkler => "sprinkler",
        }
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Device::Heater => &["heater", "heating", "radiator", "thermostat"],
            Device::Light => &["light", "lights", "lamp", "ceiling light"],
            Device::Blinds => &["blinds", "shades", "shutters", "curtains"],
            Device::Lock => &["lock", "door lock", "door"],
            Device::Fan => &["fan", "ceiling fan", "ventilator"],
            Device::Sprinkler => &["sprinkler", "sprinklers", "irrigation", "watering"],
        }
    }
}

const SMALL_WORDS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// A number as text: digits usually, words now and then when it is a small integer.
fn spoken_int(rng: &mut Rng, n: u32) -> String {
    if n <= 20 && rng.chance(0.3) {
        SMALL_WORDS[n as usize].to_owned()
    } else {
        n.to_string()
    }
}

/// A time: canonical `HH:MM` and a spoken form.
fn time(rng: &mut Rng) -> (String, String) {
    let h = rng.below(24) as u32;
    let m = *rng.pick(&[0u32, 0, 0, 15, 30, 30, 45, 5, 20, 50]);
    let canonical = format!("{h:02}:{m:02}");
    let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
    let ampm = if h < 12 { "am" } else { "pm" };
    let spoken = match rng.below(5) {
        0 => format!("at {h:02}:{m:02}"),
        1 if m == 0 => format!("at {h12}{ampm}"),
        1 => format!("at {h12}:{m:02}{ampm}"),
        2 if m == 0 => format!("at {h12} {}", if ampm == "am" { "a.m." } else { "p.m." }),
        2 => format!("at {h12}:{m:02} {ampm}"),
        3 if m == 0 && (6..12).contains(&h) => format!("at {} in the morning", spoken_int(rng, h12)),
        3 if m == 0 && (17..22).contains(&h) => format!("at {} in the evening", spoken_int(rng, h12)),
        _ => format!("at {h}:{m:02}"),
    };
    (canonical, spoken)
}

/// A device as the user names it: how it behaves (`kind`), its canonical word and the names
/// people call it by.
#[derive(Clone, Copy)]
struct DeviceWords {
    kind: Device,
    canonical: &'static str,
    names: &'static [&'static str],
}

impl From<Device> for DeviceWords {
    fn from(d: Device) -> Self {
        DeviceWords { kind: d, canonical: d.canonical(), names: d.names() }
    }
}

/// One command: its canonical answer and a phrasing of it.
fn command(rng: &mut Rng, device: impl Into<DeviceWords>, place: &[&str]) -> (String, String) {
    let words = device.into();
    let device = words.kind;
    let p = place[1 + rng.below(place.len() - 1)];
    let d = *rng.pick(words.names);
    let the = |rng: &mut Rng| if rng.chance(0.85) { "the " } else { "" };
    let (action, value, phrase) = match device {
        Device::Heater => {
            let fahrenheit = rng.chance(0.25);
            let (v, unit) =
                if fahrenheit { ((60 + rng.below(21)) as f32, "F") } else { ((30 + rng.below(22)) as f32 / 2.0, "C") };
            let num = if v.fract() == 0.0 { spoken_int(rng, v as u32) } else { format!("{v}") };
            let unit_word = match (fahrenheit, rng.below(3)) {
                (true, 0) => " fahrenheit",
                (true, _) => " degrees fahrenheit",
                (false, 0) => " degrees",
                (false, 1) => "°C",
                (false, _) => " degrees celsius",
            };
            let verb = *rng.pick(&["set", "put", "change", "turn", "adjust"]);
            let t1 = the(rng);
            let phrase = match rng.below(3) {
                0 => format!("{verb} {t1}{p} {d} to {num}{unit_word}"),
                1 => format!("{verb} {t1}{d} in {}{p} to {num}{unit_word}", the(rng)),
                _ => format!("make {t1}{p} {num}{unit_word}"),
            };
            ("set", Some(format!("{v}{unit}")), phrase)
        }
        Device::Light => {
            let t1 = the(rng);
            match rng.below(3) {
                0 => {
                    let on = rng.chance(0.5);
                    let w = if on {
                        *rng.pick(&["turn on", "switch on", "put on"])
                    } else {
                        *rng.pick(&["turn off", "switch off", "shut off"])
                    };
                    let phrase = if rng.chance(0.5) {
                        format!("{w} {t1}{p} {d}")
                    } else {
                        format!("{w} {t1}{d} in {}{p}", the(rng))
                    };
                    (if on { "on" } else { "off" }, None, phrase)
                }
                _ => {
                    let n = 5 * (1 + rng.below(19)) as u32;
                    let verb = *rng.pick(&["dim", "set", "brighten", "change"]);
                    let pct = if rng.chance(0.5) { "%".to_owned() } else { " percent".to_owned() };
                    ("dim", Some(format!("{n}%")), format!("{verb} {t1}{p} {d} to {}{pct}", spoken_int(rng, n)))
                }
            }
        }
        Device::Blinds => {
            let t1 = the(rng);
            match rng.below(3) {
                0 => ("open", None, format!("{} {t1}{p} {d}", rng.pick(&["open", "raise", "pull up"]))),
                1 => ("close", None, format!("{} {t1}{d} in {}{p}", rng.pick(&["close", "lower", "shut"]), the(rng))),
                _ => {
                    let n = 10 * (1 + rng.below(9)) as u32;
                    ("set", Some(format!("{n}%")), format!("set {t1}{p} {d} to {} percent open", spoken_int(rng, n)))
                }
            }
        }
        Device::Lock => {
            let lock = rng.chance(0.5);
            let w = if lock {
                *rng.pick(&["lock", "secure", "bolt"])
            } else {
                *rng.pick(&["unlock", "open up", "release"])
            };
            (if lock { "lock" } else { "unlock" }, None, format!("{w} {}{p} {d}", the(rng)))
        }
        Device::Fan => {
            let t1 = the(rng);
            match rng.below(3) {
                0 => ("on", None, format!("{} {t1}{p} {d}", rng.pick(&["turn on", "start", "switch on"]))),
                1 => (
                    "off",
                    None,
                    format!("{} {t1}{d} in {}{p}", rng.pick(&["turn off", "stop", "switch off"]), the(rng)),
                ),
                _ => {
                    let n = 1 + rng.below(5) as u32;
                    ("speed", Some(n.to_string()), format!("set {t1}{p} {d} to speed {}", spoken_int(rng, n)))
                }
            }
        }
        Device::Sprinkler => {
            let n = 5 * (1 + rng.below(12)) as u32;
            let minutes = if rng.chance(0.5) { "minutes" } else { "min" };
            let verb = *rng.pick(&["run", "start", "turn on"]);
            ("run", Some(format!("{n}min")), format!("{verb} {}{p} {d} for {} {minutes}", the(rng), spoken_int(rng, n)))
        }
    };
    let mut out = format!("{} {} {action}", words.canonical, place[0]);
    if let Some(v) = value {
        out.push(' ');
        out.push_str(&v);
    }
    let mut phrase = phrase;
    if rng.chance(0.35) {
        let (canonical, spoken) = time(rng);
        out.push(' ');
        out.push_str(&canonical);
        phrase = if rng.chance(0.3) { format!("{spoken} {phrase}") } else { format!("{phrase} {spoken}") };
    }
    let polite = *rng.pick(&["", "", "", "please ", "could you ", "hey board, ", "i want you to ", "kindly "]);
    let tail = *rng.pick(&["", "", "", " please", " thanks", " now"]);
    let mut text = format!("{polite}{phrase}{tail}");
    if rng.chance(0.15) {
        text = typo(rng, &text);
    }
    (out, text)
}

/// One typing slip: a swapped, dropped or doubled letter inside a word.
fn typo(rng: &mut Rng, s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    let letters: Vec<usize> = (1..chars.len().saturating_sub(1))
        .filter(|&i| chars[i].is_ascii_alphabetic() && chars[i + 1].is_ascii_alphabetic())
        .collect();
    if letters.is_empty() {
        return s.to_owned();
    }
    let i = *rng.pick(&letters);
    match rng.below(3) {
        0 => chars.swap(i, i + 1),
        1 => {
            chars.remove(i);
        }
        _ => chars.insert(i, chars[i]),
    }
    chars.into_iter().collect()
}

/// The three splits of the task.
#[derive(Debug, Clone)]
pub struct TaskSplits {
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples (same (device, place) pairs as training, other sentences).
    pub validation: Vec<Example>,
    /// Test examples, only from (device, place) pairs held out of the other splits.
    pub test: Vec<Example>,
}

/// The (device, place) pairs held out for the test split, balanced: every place is held out
/// with exactly one device and every device with the same number of places (12 places over 6
/// devices: two each), assigned in a seeded order. So every place is still seen with all other
/// devices in training, and no device loses more of its places than another.
fn held_out(rng: &mut Rng) -> BTreeSet<(Device, usize)> {
    let mut places: Vec<usize> = (0..PLACES.len()).collect();
    rng.shuffle(&mut places);
    let mut devices = DEVICES;
    rng.shuffle(&mut devices);
    places.into_iter().enumerate().map(|(i, p)| (devices[i % devices.len()], p)).collect()
}

/// Generates `train` training examples plus a tenth as many validation and test examples each,
/// deterministically from `seed`. No input text appears in two splits.
pub fn generate(seed: u64, train: usize) -> TaskSplits {
    let mut rng = Rng::new(seed);
    let test_pairs = held_out(&mut rng);
    let n_eval = (train / 10).max(1);
    let mut seen = std::collections::HashSet::new();
    let make = |rng: &mut Rng, n: usize, test: bool, seen: &mut std::collections::HashSet<String>| {
        let mut out = Vec::with_capacity(n);
        let mut attempts = 0usize;
        while out.len() < n && attempts < n * 50 {
            attempts += 1;
            let d = *rng.pick(&DEVICES);
            let p = rng.below(PLACES.len());
            if test_pairs.contains(&(d, p)) != test {
                continue;
            }
            let (output, input) = command(rng, d, PLACES[p]);
            if seen.insert(input.clone()) {
                out.push(Example { instruction: INSTRUCTION.to_owned(), input, output });
            }
        }
        out
    };
    let train_set = make(&mut rng, train, false, &mut seen);
    let validation = make(&mut rng, n_eval, false, &mut seen);
    let test = make(&mut rng, n_eval, true, &mut seen);
    TaskSplits { train: train_set, validation, test }
}

/// Places of "the user's own home" that the built-in task never mentions.
const HOME_PLACES: &[&[&str]] = &[
    &["greenhouse", "greenhouse", "glasshouse"],
    &["sauna", "sauna", "steam room"],
    &["workshop", "workshop", "shed"],
    &["pantry", "pantry", "larder"],
    &["guestroom", "guest room", "spare room"],
    &["balcony", "balcony", "terrace"],
];

/// Devices of the user's home that the built-in task never mentions, each behaving like one
/// it knows (so the command grammar is the same and only the words are new).
const HOME_DEVICES: &[DeviceWords] = &[
    DeviceWords { kind: Device::Fan, canonical: "dehumidifier", names: &["dehumidifier", "air dryer"] },
    DeviceWords { kind: Device::Heater, canonical: "aircon", names: &["aircon", "air conditioner", "ac unit"] },
    DeviceWords { kind: Device::Blinds, canonical: "awning", names: &["awning", "sunshade", "canopy"] },
    DeviceWords { kind: Device::Lock, canonical: "gate", names: &["gate", "side gate"] },
    DeviceWords { kind: Device::Sprinkler, canonical: "pump", names: &["pump", "water pump"] },
    DeviceWords { kind: Device::Light, canonical: "spotlight", names: &["spotlight", "spotlights", "floodlight"] },
];

/// Fine-tuning data from "the user's own home": commands naming devices and places the
/// built-in task never has (a new device in a known place, a known device in a new place, or
/// both, a third each), `train` training examples and a fifth as many validation and test
/// examples each, deterministically from `seed`. No input text appears in two splits, and none
/// can occur in `generate`'s splits, as every one names a new device or place.
pub fn generate_home(seed: u64, train: usize) -> TaskSplits {
    let mut rng = Rng::new(seed ^ 0x686f_6d65);
    let n_eval = (train / 5).max(1);
    let mut seen = std::collections::HashSet::new();
    let mut make = |rng: &mut Rng, n: usize| {
        let mut out = Vec::with_capacity(n);
        let mut attempts = 0usize;
        while out.len() < n && attempts < n * 50 {
            attempts += 1;
            let (new_device, new_place) = match rng.below(3) {
                0 => (true, false),
                1 => (false, true),
                _ => (true, true),
            };
            let device = if new_device { *rng.pick(HOME_DEVICES) } else { (*rng.pick(&DEVICES)).into() };
            let place =
                if new_place { HOME_PLACES[rng.below(HOME_PLACES.len())] } else { PLACES[rng.below(PLACES.len())] };
            let (output, input) = command(rng, device, place);
            if seen.insert(input.clone()) {
                out.push(Example { instruction: INSTRUCTION.to_owned(), input, output });
            }
        }
        out
    };
    let train_set = make(&mut rng, train);
    let validation = make(&mut rng, n_eval);
    let test = make(&mut rng, n_eval);
    TaskSplits { train: train_set, validation, test }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_data_and_other_seeds_differ() {
        let a = generate(7, 500);
        let b = generate(7, 500);
        assert_eq!(a.train, b.train);
        assert_eq!(a.test, b.test);
        assert_ne!(generate(8, 500).train, a.train);
        assert_eq!(a.train.len(), 500);
        assert_eq!(a.validation.len(), 50);
        assert_eq!(a.test.len(), 50);
    }

    #[test]
    fn test_split_shares_no_example_and_no_device_place_pair_with_training() {
        let s = generate(1, 20_000);
        assert_eq!(s.train.len(), 20_000);
        let pair = |e: &Example| e.output.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let train_pairs: BTreeSet<String> = s.train.iter().chain(&s.validation).map(pair).collect();
        let train_inputs: BTreeSet<&str> = s.train.iter().map(|e| e.input.as_str()).collect();
        for e in &s.test {
            assert!(!train_pairs.contains(&pair(e)), "{} occurs in training", pair(e));
            assert!(!train_inputs.contains(e.input.as_str()));
        }
        // Balanced: each place held out with exactly one device, each device with two places.
        let held: BTreeSet<String> = s.test.iter().map(pair).collect();
        assert_eq!(held.len(), PLACES.len());
        for d in DEVICES {
            assert_eq!(held.iter().filter(|p| p.split(' ').next() == Some(d.canonical())).count(), 2);
        }
        for p in PLACES {
            assert_eq!(held.iter().filter(|h| h.split(' ').nth(1) == Some(p[0])).count(), 1);
        }
        // Every device and every place still occurs in training.
        for d in DEVICES {
            assert!(s.train.iter().any(|e| e.output.starts_with(d.canonical())));
        }
        for p in PLACES {
            assert!(s.train.iter().any(|e| e.output.split(' ').nth(1) == Some(p[0])));
        }
    }

    #[test]
    fn home_data_names_only_what_the_built_in_task_never_does() {
        let home = generate_home(2, 1000);
        assert_eq!((home.train.len(), home.validation.len(), home.test.len()), (1000, 200, 200));
        let base = generate(1, 20_000);
        let base_words: BTreeSet<&str> = base.train.iter().flat_map(|e| e.output.split(' ').take(2)).collect();
        let all: Vec<&Example> = home.train.iter().chain(&home.validation).chain(&home.test).collect();
        for e in &all {
            let mut words = e.output.split(' ');
            let (device, place) = (words.next().unwrap(), words.next().unwrap());
            assert!(!base_words.contains(device) || !base_words.contains(place), "{} names nothing new", e.output);
        }
        // New devices appear in known places, known devices in new places, and both together.
        let new_dev = |e: &&Example| HOME_DEVICES.iter().any(|d| e.output.starts_with(&format!("{} ", d.canonical)));
        let new_place = |e: &&Example| HOME_PLACES.iter().any(|p| e.output.split(' ').nth(1) == Some(p[0]));
        assert!(all.iter().any(|e| new_dev(e) && !new_place(e)));
        assert!(all.iter().any(|e| !new_dev(e) && new_place(e)));
        assert!(all.iter().any(|e| new_dev(e) && new_place(e)));
        let inputs: BTreeSet<&str> = all.iter().map(|e| e.input.as_str()).collect();
        assert_eq!(inputs.len(), all.len(), "no sentence in two splits");
        assert_eq!(generate_home(2, 1000).test, home.test);
    }

    #[test]
    fn the_example_from_the_issue_has_this_shape() {
        // Outputs follow `<device> <place> <action> [value] [HH:MM]`.
        let s = generate(3, 2000);
        let re_ok = |o: &str| {
            let parts: Vec<&str> = o.split(' ').collect();
            (3..=5).contains(&parts.len()) && parts.last().is_some_and(|l| !l.is_empty())
        };
        assert!(s.train.iter().all(|e| re_ok(&e.output)), "canonical outputs");
        assert!(s.train.iter().any(|e| e.output.starts_with("heater kitchen set ") && e.output.ends_with(":00")));
        assert!(s.train.iter().any(|e| e.output.contains('F')), "Fahrenheit appears");
        assert!(s.train.iter().any(|e| e.input.contains("please")), "politeness varies");
    }
}
