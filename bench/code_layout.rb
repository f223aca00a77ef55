# frozen_string_literal: true

# Writes ext/code_layout.ld, the linker script that gathers the code the
# proxy runs once started into one region of the extension and of `thrust`.
#
# Why: the kernel maps a whole 64 KiB folio of the file around each page
# fault, and the linker scatters functions by crate and module, so the few
# hundred functions a request runs kept nearly all of the 6 MiB of code
# resident in the Puma master (bench/memory.rb). Grouped, they fill ~1.7 MiB;
# start-up code follows in a region of its own, which sys::code_pages
# unmaps once the proxy has started.
#
# How: Puma with the proxy in-process (bench/app.ru, 2 workers) runs under
# valgrind's callgrind; the profile is cut once the proxy has started
# ("start-up"), again after a first round of bench/memory.rb's workload (50
# small requests, then the mixed warm-up: the cached CSS in four codings,
# the page compressed per request, 13-byte responses, X-Sendfile
# downloads), which fills the cache ("fill"), and after a second round of
# the same requests, all answered from a filled cache ("steady"). Every
# function of the extension with a cost in the steady part goes to
# `.text.hot`; the other functions seen go to `.text.warm`: the start, and
# what only cache fills run (the stored variants' encoders at brotli 11,
# zstd 19, gzip 9), whose pages sys::code_pages releases once fills settle.
#
# Names are matched without their hashes (`17h<hash>E`, `Cs<hash>_`), which
# change with every compiler and dependency version: the script keeps
# working across toolchains, at the price of also moving every other
# instantiation of a generic function seen (the hot region is ~1.7 MiB for
# 1.2 MiB of functions run). Functions it misses stay where the linker puts
# them: a stale script costs memory, never correctness.
#
# Needs valgrind and an extension with its symbols, linked without the
# script (valgrind reads symbols in `.text` only: those of .text.hot and
# .text.warm would all be "???"):
#
#   THRUSTER_NO_CODE_LAYOUT=1 CARGO_PROFILE_RELEASE_STRIP=false bundle exec rake compile
#   ruby bench/code_layout.rb
#   bundle exec rake compile     # the stripped build, with the new layout
#   ruby bench/memory.rb         # check: the extension's pages after the warm-up
#
# The profiled build differs from the shipped one by `strip`, which changes
# cargo's metadata hash and so every symbol's hash; the patterns ignore
# hashes, but LTO may then inline differently. With this script as
# committed, the stripped build keeps 2.3 MiB of code resident after the
# warm-up; a change that made it run much more code outside .text.hot
# (docs/benchmarks.md, Memory: the front-end allocator) showed up there.

require "net/http"
require "tmpdir"
require "fileutils"
require "rbconfig"
require "set"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
SO = File.join(ROOT, "lib", "thruster", "thruster_rs.so")
OUT = File.join(ROOT, "ext", "code_layout.ld")
PUMA = Gem.bin_path("puma", "puma")

abort "bench/code_layout: valgrind is missing" unless system("valgrind --version", out: File::NULL)
if !`nm #{SO} 2>&1`.include?(" T Init_thruster_rs") || `readelf -SW #{SO}`.include?(".text.hot")
  abort "bench/code_layout: #{SO} has no symbols or is laid out already; build it with " \
        "THRUSTER_NO_CODE_LAYOUT=1 CARGO_PROFILE_RELEASE_STRIP=false bundle exec rake compile"
end

def workload(port)
  BenchTraffic.mixed_traffic(port, requests: 300, downloads: 4, read_timeout: 120)
end

# Names behind callgrind's compressed "(id) name" references.
class Names
  def initialize
    @table = {}
  end

  def [](value)
    m = value.match(/\A\((\d+)\)(?: (.*))?\z/) or return value
    @table[m[1]] = m[2] if m[2]
    @table[m[1]]
  end
end

# The extension's functions and their own cost in one callgrind dump.
class Dump
  attr_reader :costs

  def initialize(file)
    @names = Names.new
    @objects = Names.new
    @costs = Hash.new(0)
    File.foreach(file, chomp: true) { |line| read(line) }
  end

  private

  def read(line)
    key, value = line.split("=", 2)
    case key
    when "ob" then @object = @objects[value]
    when "fn" then @function = @names[value]
    when "cfn" then @names[value]
    when "cob" then @objects[value]
    when "calls" then @call = true # the next cost line is a call's
    else cost(line)
    end
  end

  def cost(line)
    return unless line.match?(/\A[+\-*]?\d/)

    @costs[@function.sub(/'\d+\z/, "")] += line.split[1].to_i if !@call && @object&.end_with?("thruster_rs.so")
    @call = false
  end
end

def functions(file) = Dump.new(file).costs

# Input-section patterns of a function, without the hashes.
def patterns(name)
  base = if name.start_with?("_ZN") then name.sub(/17h\h{16}E(\..*)?\z/, "17h*")
         elsif name.start_with?("_R") then "#{name.gsub(/Cs[0-9A-Za-z]*_/, 'Cs*_').gsub(/B[0-9A-Za-z]*_/, 'B*_')}*"
         else
           "#{name}*" # C: zstd, ring
         end
  # LLVM puts functions it deems cold in .text.unlikely.<name>.
  ".text.#{base} .text.unlikely.#{base}"
end

dir = Dir.mktmpdir("thruster-layout")
at_exit { FileUtils.rm_rf(dir) } unless ENV["KEEP"]
File.open(File.join(dir, "big.bin"), "wb") { |f| 16.times { f.write(Random.bytes(1 << 20)) } }
port = BenchSupport.free_port
env = { "APP_DIR" => dir, "WORKERS" => "2", "RUBYLIB" => File.join(ROOT, "lib"), "RUBYOPT" => nil,
        "BUNDLE_GEMFILE" => nil, "LOG_REQUESTS" => "false", "PORT" => port.to_s,
        "BENCH_BIG" => File.join(dir, "big.bin"), "STORAGE_PATH" => File.join(dir, "storage") }
profile = File.join(dir, "callgrind")
pid = Process.spawn(env, "valgrind", "--tool=callgrind", "--demangle=no", "--callgrind-out-file=#{profile}.%p",
                    RbConfig.ruby, PUMA, "-C", File.join(ROOT, "spec", "fixtures", "puma_plugin.rb"),
                    File.join(ROOT, "bench", "app.ru"), out: File::NULL, err: File::NULL, pgroup: true)
begin
  BenchSupport.wait_for(port, path: "/up", timeout: 600)
  sleep 1 until BenchSupport.tree(pid).size >= 3
  sleep 5 # the proxy's set-up tasks and sys::code_pages' release
  system("callgrind_control", "--dump=start-up", pid.to_s, out: File::NULL, err: File::NULL, exception: true)
  50.times { Net::HTTP.get_response(URI("http://127.0.0.1:#{port}/hello")) }
  workload(port)
  system("callgrind_control", "--dump=fill", pid.to_s, out: File::NULL, err: File::NULL, exception: true)
  sleep 3 # pools freed, pages of the fills released (sys::code_pages)
  workload(port)
  system("callgrind_control", "--dump=steady", pid.to_s, out: File::NULL, err: File::NULL, exception: true)
ensure
  Process.kill("TERM", -pid)
  Process.wait(pid)
end

# Dumps of the master: .1 start-up, .2 fill, .3 steady, the last at exit.
start_up, fill, steady, exit_dump = %W[#{profile}.#{pid}.1 #{profile}.#{pid}.2 #{profile}.#{pid}.3
                                       #{profile}.#{pid}].map { functions(_1) }
# Sorted by name, not by cost: within a region the order matters little
# (all of it is touched), and a new run then changes only what changed.
hot = steady.keys.map { patterns(_1) }.uniq.sort
warm = ((start_up.keys + fill.keys + exit_dump.keys).map { patterns(_1) }.uniq - hot).sort
File.write(OUT, <<~LD)
  /* The code the proxy runs once started, gathered: written by
     bench/code_layout.rb (#{Time.now.utc.strftime('%Y-%m-%d')}), which says why and how; linked by
     ext/code_layout.rs, both front ends' build script. .text.hot: what
     bench/memory.rb's requests ran on a filled cache; .text.warm: what
     else ran, the start and cache fills (released after them by
     sys::code_pages). A function missing from
     both stays in .text, where the linker puts it. */
  SECTIONS
  {
    .text.hot : {
  #{hot.map { "    *(#{_1})" }.join("\n")}
    }
    .text.warm : {
  #{warm.map { "    *(#{_1})" }.join("\n")}
    }
  }
  INSERT BEFORE .text;
LD
puts "bench/code_layout: #{steady.size} functions ran in steady state (#{hot.size} patterns), " \
     "#{warm.size} more patterns for the rest; wrote #{OUT}"
