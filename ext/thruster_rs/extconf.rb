# frozen_string_literal: true

# Builds the Ruby extension (thruster_rs.so) and the `thrust` wrapper binary
# with cargo. Written by hand instead of using the rb_sys gem: mkmf only
# writes a Makefile that calls cargo.

require "mkmf"
require "rbconfig"

cargo = ENV["CARGO"] || find_executable("cargo") ||
        [File.join(Dir.home, ".cargo/bin/cargo")].find { |c| File.executable?(c) }
unless cargo
  abort <<~MSG
    thruster-rs: cargo (Rust >= 1.85) was not found, so the extension cannot be compiled.
    Install Rust with rustup (https://rustup.rs) and put ~/.cargo/bin on PATH, or set CARGO=/path/to/cargo.
    Or install the precompiled platform gem (thruster-rs-<version>-x86_64-linux.gem), which needs no Rust.
  MSG
end

crate_dir = File.expand_path(__dir__)
workspace = File.expand_path("../..", crate_dir)
profile = ENV.fetch("THRUSTER_CARGO_PROFILE", "release")
out_subdir = profile == "dev" ? "debug" : profile
target_dir = ENV["CARGO_TARGET_DIR"] || File.join(Dir.pwd, "target")
# Under `gem install` (no CARGO_TARGET_DIR) the ~300 MB target dir is removed
# once the artefacts are installed.
purge = ENV["CARGO_TARGET_DIR"].nil? && ENV["THRUSTER_KEEP_TARGET"].nil?
locked = File.exist?(File.join(workspace, "Cargo.lock")) ? "--locked" : ""
dlext = RbConfig::CONFIG["DLEXT"]
ext_file = "thruster_rs.#{dlext}"
built_lib = File.join(target_dir, out_subdir, "libthruster_rs.so")
built_bin = File.join(target_dir, out_subdir, "thrust")

# A shell command that copies `src` to a temporary file next to `dest` and
# renames it over `dest`. A plain `cp` onto a running `thrust` fails with
# "Text file busy", and onto a loaded extension it would change the pages of
# every process that mapped it; a rename leaves them their old file.
# (`$$$$` is the shell's pid once make has halved the dollars.)
def install_by_rename(src, dest)
  tmp = File.join(File.dirname(dest), ".#{File.basename(dest)}.tmp.$$$$")
  %(cp "#{src}" "#{tmp}" && mv -f "#{tmp}" "#{dest}" || { rm -f "#{tmp}"; exit 1; })
end

File.write("Makefile", <<~MAKE)
  SHELL = /bin/sh
  RUBY = #{RbConfig.ruby}
  CARGO = #{cargo}
  sitearchdir = #{File.expand_path('../../lib', crate_dir)}
  DESTDIR =

  all: #{ext_file} thrust

  #{ext_file} thrust: FORCE
  \tenv RUBY="$(RUBY)" CARGO_TARGET_DIR="#{target_dir}" "$(CARGO)" build #{locked} --manifest-path "#{workspace}/Cargo.toml" -p thruster_rs -p thrust --profile #{profile} $(CARGO_FLAGS)
  \tcp "#{built_lib}" #{ext_file}
  \tcp "#{built_bin}" thrust

  install: all
  \tmkdir -p "$(DESTDIR)$(sitearchdir)/thruster"
  \t#{install_by_rename(ext_file, "$(DESTDIR)$(sitearchdir)/thruster/#{ext_file}")}
  \t#{install_by_rename('thrust', '$(DESTDIR)$(sitearchdir)/thruster/thrust')}
  #{purge ? "\trm -rf \"#{target_dir}\"" : ''}

  clean:
  \trm -f #{ext_file} thrust

  distclean: clean
  \trm -rf "#{target_dir}" Makefile

  FORCE:
  .PHONY: all install clean distclean FORCE
MAKE
