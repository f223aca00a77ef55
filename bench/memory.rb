# frozen_string_literal: true

# Memory of a Puma cluster (2 workers) as PSS, the measure that counts pages
# shared copy-on-write between master and workers once:
#
#   1. Puma alone (TCP bind)
#   2. Puma with the proxy in-process (plugin :thruster_rs)
#   3. Puma wrapped by `thrust`
#
# Each setup serves bench/app.ru. It is started, sent 50 small requests,
# left idle and measured ("idle"); then warmed up with mixed traffic —
# WARMUP requests (default 300) on 4 connections: the cached 100 KB CSS in
# gzip, br, zstd and identity, the 20 KB private page compressed per request
# (br and gzip), 13-byte responses, and DOWNLOADS (default 4) 16 MiB
# downloads (X-Sendfile through the proxy, streamed by Puma alone), twice,
# 1.5 s apart (the second round finds the cache filled and the proxy
# settled: what steady traffic keeps) — left idle again and measured
# ("after warm-up"). PSS is summed over the whole
# process tree from /proc/<pid>/smaps_rollup. Repeated REPEAT times
# (default 3), interleaved; medians are reported.
#
# "proxy's own" is the proxy's share: in-process, the Puma master's PSS less
# the master's of Puma alone (the proxy runs in the master only; workers
# never touch their copy); under thrust, the thrust process's PSS. The
# masters are compared without the files Puma alone maps too (libruby,
# libc, Ruby's extensions): the same pages in both setups, whose PSS moves
# with every other Ruby process on the machine that shares them. What is
# left is the master's anonymous memory (malloc arenas, stacks), the
# extension (thruster_rs.so) and any library only it loads. Target: at most
# 4 MiB for the in-process proxy, idle and after warm-up; the script exits
# 1 when the median misses it.
#
#   ruby bench/memory.rb            # prints a markdown table, writes bench/results/memory.md
#   REPEAT=5 ruby bench/memory.rb

require "json"
require "net/http"
require "socket"
require "tmpdir"
require "fileutils"
require "rbconfig"
require "set"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
FIXTURES = File.join(ROOT, "spec", "fixtures")
THRUST = File.join(ROOT, "lib", "thruster", "thrust")
REPEAT = Integer(ENV.fetch("REPEAT", "3"))
WARMUP = Integer(ENV.fetch("WARMUP", "300"))
DOWNLOADS = Integer(ENV.fetch("DOWNLOADS", "4"))
TARGET_MIB = 4.0
PUMA = Gem.bin_path("puma", "puma")
APP = File.join(ROOT, "bench", "app.ru")
SETUPS = ["puma alone", "puma + in-process proxy", "puma under thrust"].freeze

abort "bench/memory: #{THRUST} missing; run `bundle exec rake compile`" unless File.executable?(THRUST)

# The download, in the temp dir (an X-Sendfile root by default).
DATA_DIR = Dir.mktmpdir("thruster-mem-data")
at_exit { FileUtils.rm_rf(DATA_DIR) }
BIG = File.join(DATA_DIR, "big.bin")
File.open(BIG, "wb") { |f| 16.times { f.write(Random.bytes(1 << 20)) } }

# The command and environment of one setup, listening on `port`.
def setup_command(name, port, dir)
  env = { "APP_DIR" => dir, "WORKERS" => "2", "RUBYLIB" => File.join(ROOT, "lib"), "RUBYOPT" => nil,
          "BUNDLE_GEMFILE" => nil, "LOG_REQUESTS" => "false", "PORT" => port.to_s, "BENCH_BIG" => BIG,
          "STORAGE_PATH" => File.join(dir, "storage") }
  puma = [RbConfig.ruby, PUMA, "-C", File.join(FIXTURES, "puma_plugin.rb"), APP]
  case name
  when "puma alone" then [env.merge("NO_PLUGIN" => "1"), puma]
  when "puma + in-process proxy" then [env, puma]
  else
    # Under thrust the plugin stands aside: this is Puma alone plus the wrapper.
    [env.merge("HTTP_PORT" => port.to_s, "TARGET_PORT" => BenchSupport.free_port.to_s, "NO_PLUGIN" => "1"),
     [THRUST, *puma]]
  end
end

def warm_up(port)
  failures = BenchTraffic.mixed_traffic(port, requests: WARMUP, downloads: DOWNLOADS)
  abort "bench/memory: warm-up failed: #{failures.first}" unless failures.empty?
end

# PSS in KiB of each file a process maps, and of its anonymous memory
# (heap, stacks, other mappings without a file) under nil.
def pss_by_file(pid)
  files = Hash.new(0)
  file = nil
  File.foreach("/proc/#{pid}/smaps") do |line|
    if (mapping = line.match(/\A\h+-\h+ \S+ \S+ \S+ \d+\s*(.*)$/))
      path = mapping[1]
      file = path.start_with?("/") ? path : nil
    elsif (pss = line[/\APss:\s+(\d+)/, 1])
      files[file] += pss.to_i
    end
  end
  files
rescue Errno::ENOENT, Errno::ESRCH
  {}
end

# PSS in KiB of the tree, of the Puma master (in all and by file) and of
# thrust (nil without).
def sample(pid, name)
  tree = BenchSupport.tree(pid)
  thrust = name == "puma under thrust" ? pid : nil
  master = thrust ? BenchSupport.children(pid).first : pid
  { tree: BenchSupport.pss_kib(tree), master: BenchSupport.pss_kib([master]), master_files: pss_by_file(master),
    thrust: thrust && BenchSupport.pss_kib([thrust]) }
end

def measure(name)
  dir = Dir.mktmpdir("thruster-mem")
  port = BenchSupport.free_port
  env, argv = setup_command(name, port, dir)
  pid = Process.spawn(env, *argv, out: File::NULL, err: File::NULL, pgroup: true)
  BenchSupport.wait_for(port, path: "/up")
  sleep 1 until BenchSupport.tree(pid).size >= (name == "puma under thrust" ? 4 : 3)
  50.times { Net::HTTP.get_response(URI("http://127.0.0.1:#{port}/hello")) }
  sleep 2 # idle
  idle = sample(pid, name)
  warm_up(port)
  # Then the same traffic again once the proxy has settled (a second after
  # the last cache fill it gives back the pages only fills touched, and its
  # encoder pools go), so what is measured is what steady traffic keeps.
  sleep 1.5
  warm_up(port)
  sleep 2 # idle again
  { idle:, after: sample(pid, name) }
ensure
  if pid
    Process.kill("TERM", -pid)
    Process.wait(pid)
  end
  FileUtils.rm_rf(dir) if dir
end

samples = Hash.new { |h, k| h[k] = [] }
REPEAT.times do |i|
  SETUPS.each do |name|
    samples[name] << (s = measure(name))
    warn format("run %<run>d/%<total>d  %-24<name>s PSS idle %<idle>.1f MiB, after warm-up %<after>.1f MiB",
                run: i + 1, total: REPEAT, name:, idle: s[:idle][:tree] / 1024.0, after: s[:after][:tree] / 1024.0)
  end
end

def median(values) = values.sort[values.size / 2]
def mib(kib) = kib / 1024.0
def stat(samples, name, phase, key) = median(samples[name].map { |s| s[phase][key] })

# Files the master of Puma alone maps: counted in neither master.
PUMA_FILES = samples["puma alone"].flat_map do |s|
  %i[idle after].flat_map do |p|
    s[p][:master_files].keys.compact
  end
end.to_set

# The master's PSS in KiB without the files of PUMA_FILES, median.
def master_own(samples, name, phase)
  median(samples[name].map { |s| s[phase][:master_files].sum { |file, kib| PUMA_FILES.include?(file) ? 0 : kib } })
end

# The proxy's own PSS in KiB in one phase.
def own(samples, name, phase)
  case name
  when "puma + in-process proxy" then master_own(samples, name, phase) - master_own(samples, "puma alone", phase)
  when "puma under thrust" then stat(samples, name, phase, :thrust)
  end
end

# PSS in KiB of the extension's pages in the in-process master, median.
def extension(samples, phase)
  median(samples["puma + in-process proxy"].map do |s|
    s[phase][:master_files].sum { |file, kib| file&.end_with?("/thruster_rs.so") ? kib : 0 }
  end)
end

rows = SETUPS.map do |name|
  cells = %i[idle after].flat_map do |phase|
    tree = stat(samples, name, phase, :tree)
    spread = samples[name].map { |s| s[phase][:tree] }.minmax.reverse.inject(:-)
    added = name == "puma alone" ? "–" : format("%+.1f", mib(tree - stat(samples, "puma alone", phase, :tree)))
    proxy = own(samples, name, phase)
    [format("%.1f", mib(tree)), format("%.1f", mib(spread)), added, proxy ? format("%.1f", mib(proxy)) : "–"]
  end
  "| #{name.ljust(23)} | #{cells.join(' | ')} |"
end

# glibc malloc tunables given to the run (MALLOC_MMAP_THRESHOLD_=131072 shows
# how much of the warm-up growth is freed memory malloc keeps; see
# docs/benchmarks.md, Memory).
tunables = ENV.select { |key, _| key.start_with?("MALLOC_", "GLIBC_TUNABLES") }.map { |k, v| "#{k}=#{v}" }
environment = tunables.empty? ? "" : " Environment: #{tunables.join(' ')}."
inproc = %i[idle after].to_h { |phase| [phase, mib(own(samples, "puma + in-process proxy", phase))] }
met = inproc.values.all? { |v| v <= TARGET_MIB }
table = <<~MD
  PSS of the whole process tree, Puma 5.6 cluster with 2 workers serving bench/app.ru; median of #{REPEAT}
  interleaved runs, #{Time.now.utc.strftime('%Y-%m-%d')}, #{RUBY_DESCRIPTION.split(' [').first}. "After warm-up": after
  #{WARMUP} mixed requests on 4 connections (cached CSS in gzip/br/zstd/identity, the compressed page, 13-byte
  responses) and #{DOWNLOADS} downloads of 16 MiB. "Proxy's own": in-process, the Puma master's PSS less Puma
  alone's master, both without the files Puma alone maps too (libruby, libc: the same pages in both, shared with
  other processes on the machine); under thrust, the thrust process. "Added": the tree's PSS less Puma alone's (whose
  workers stream the downloads themselves: behind the proxy they are X-Sendfile).#{environment}

  | setup                   | idle MiB | spread | added | proxy's own | after warm-up MiB | spread | added | proxy's own |
  |-------------------------|---------:|-------:|------:|------------:|------------------:|-------:|------:|------------:|
  #{rows.join("\n")}

  In-process proxy's own PSS: #{format('%.1f', inproc[:idle])} MiB idle, #{format('%.1f', inproc[:after])} MiB after warm-up
  (target ≤ #{TARGET_MIB.round} MiB: #{met ? 'met' : 'NOT met'}); of it, the extension's pages (thruster_rs.so):
  #{format('%.1f', mib(extension(samples, :idle)))} MiB idle, #{format('%.1f', mib(extension(samples, :after)))} MiB after warm-up.
MD
puts table
FileUtils.mkdir_p(File.join(ROOT, "bench", "results"))
File.write(File.join(ROOT, "bench", "results", "memory.md"), table)
exit(met ? 0 : 1)
