//! The interrupt part of the vector table, sized for the chip.
//!
//! Without a device crate, cortex-m-rt reserves all 240 interrupt vectors an ARMv7E-M allows:
//! 960 bytes of flash. With its `device` feature the application supplies `__INTERRUPTS`
//! instead, as a PAC would. An STM32F411 has 86 (IRQ 0..=85); use your part's count from the
//! reference manual (e.g. 97 on an STM32F446). More entries than the part has are harmless,
//! fewer are not. No interrupt is enabled here, so every entry is cortex-m-rt's
//! `DefaultHandler`; a driver using an IRQ would put its handler at that position.

/// Number of device interrupts (IRQ lines) of the part.
const IRQS: usize = 86;

extern "C" {
    /// Provided by cortex-m-rt's link.x (an endless loop unless the application overrides it).
    fn DefaultHandler();
}

#[link_section = ".vector_table.interrupts"]
#[no_mangle]
static __INTERRUPTS: [unsafe extern "C" fn(); IRQS] = [DefaultHandler; IRQS];
