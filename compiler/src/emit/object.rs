//! `NAME.o`: a relocatable object holding the packed model in a read-only section.

use object::write::{Object, Symbol, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
};

use diffdfq_targets::{Arch, ObjectFormat, Target};

use crate::Error;

/// Serializes an object exporting `const uint8_t NAME_model[]` (16-byte aligned) and
/// `const size_t NAME_model_len`, plus an empty `.note.GNU-stack` so linkers do not assume an
/// executable stack.
pub fn model_object(name: &str, blob: &[u8], target: &Target) -> Result<Vec<u8>, Error> {
    let ObjectFormat::Elf = target.format;
    let arch = match target.arch {
        Arch::X86_64 => Architecture::X86_64,
        Arch::Aarch64 => Architecture::Aarch64,
    };
    let endian = if target.little_endian {
        Endianness::Little
    } else {
        Endianness::Big
    };
    let mut obj = Object::new(BinaryFormat::Elf, arch, endian);

    let data = obj.add_section(
        Vec::new(),
        format!(".rodata.{name}_model").into_bytes(),
        SectionKind::ReadOnlyData,
    );
    let off = obj.append_section_data(data, blob, 16);
    obj.add_symbol(Symbol {
        name: format!("{name}_model").into_bytes(),
        value: off,
        size: blob.len() as u64,
        kind: SymbolKind::Data,
        scope: SymbolScope::Dynamic,
        weak: false,
        section: SymbolSection::Section(data),
        flags: SymbolFlags::None,
    });

    let width = target.pointer_width as usize;
    let len = (blob.len() as u64).to_le_bytes();
    let len = if target.little_endian {
        len[..width].to_vec()
    } else {
        (blob.len() as u64).to_be_bytes()[8 - width..].to_vec()
    };
    let len_sec = obj.add_section(
        Vec::new(),
        format!(".rodata.{name}_model_len").into_bytes(),
        SectionKind::ReadOnlyData,
    );
    let off = obj.append_section_data(len_sec, &len, width as u64);
    obj.add_symbol(Symbol {
        name: format!("{name}_model_len").into_bytes(),
        value: off,
        size: width as u64,
        kind: SymbolKind::Data,
        scope: SymbolScope::Dynamic,
        weak: false,
        section: SymbolSection::Section(len_sec),
        flags: SymbolFlags::None,
    });

    obj.add_section(
        Vec::new(),
        b".note.GNU-stack".to_vec(),
        SectionKind::Elf(object::elf::SHT_PROGBITS),
    );
    obj.write()
        .map_err(|e| Error::Internal(format!("writing {name}.o: {e}")))
}
