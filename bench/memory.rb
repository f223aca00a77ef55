# frozen_string_literal: true

# Memory of a Puma cluster (2 workers) as PSS, the measure that counts pages
# shared copy-on-write between master and workers once:
#
#   1. Puma alone (TCP bind)
#   2. Puma with the proxy in-process (plugin :thruster_rs)
#   3. Puma wrapped by `thrust`
#
# Each setup is started, warmed with a few requests, left idle, then measured
# over its whole process tree (sum of Pss from /proc/<pid>/smaps_rollup).
# Repeated REPEAT times (default 3), interleaved; medians are reported.
#
#   ruby bench/memory.rb            # prints a markdown table, writes bench/results/memory.md
#   REPEAT=5 ruby bench/memory.rb

require "json"
require "net/http"
require "socket"
require "tmpdir"
require "fileutils"
require "rbconfig"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
FIXTURES = File.join(ROOT, "spec", "fixtures")
THRUST = File.join(ROOT, "lib", "thruster", "thrust")
REPEAT = Integer(ENV.fetch("REPEAT", "3"))
PUMA = Gem.bin_path("puma", "puma")

abort "bench/memory: #{THRUST} missing; run `bundle exec rake compile`" unless File.executable?(THRUST)

# The command and environment of one setup, listening on `port`.
def setup_command(name, port, dir)
  env = { "APP_DIR" => dir, "WORKERS" => "2", "RUBYLIB" => File.join(ROOT, "lib"), "RUBYOPT" => nil,
          "BUNDLE_GEMFILE" => nil, "LOG_REQUESTS" => "false", "PORT" => port.to_s }
  puma = [RbConfig.ruby, PUMA, "-C", File.join(FIXTURES, "puma_plugin.rb"), File.join(FIXTURES, "app.ru")]
  case name
  when "puma alone" then [env.merge("NO_PLUGIN" => "1"), puma]
  when "puma + in-process proxy" then [env, puma]
  else
    # Under thrust the plugin stands aside: this is Puma alone plus the wrapper.
    [env.merge("HTTP_PORT" => port.to_s, "TARGET_PORT" => BenchSupport.free_port.to_s, "NO_PLUGIN" => "1"),
     [THRUST, *puma]]
  end
end

def measure(name)
  dir = Dir.mktmpdir("thruster-mem")
  port = BenchSupport.free_port
  env, argv = setup_command(name, port, dir)
  pid = Process.spawn(env, *argv, out: File::NULL, err: File::NULL, pgroup: true)
  BenchSupport.wait_for(port, path: "/up")
  sleep 1 until BenchSupport.tree(pid).size >= (name == "puma under thrust" ? 4 : 3)
  50.times { Net::HTTP.get_response(URI("http://127.0.0.1:#{port}/h")) }
  sleep 2 # idle
  BenchSupport.pss_kib(BenchSupport.tree(pid))
ensure
  if pid
    Process.kill("TERM", -pid)
    Process.wait(pid)
  end
  FileUtils.rm_rf(dir) if dir
end

setups = ["puma alone", "puma + in-process proxy", "puma under thrust"]
samples = Hash.new { |h, k| h[k] = [] }
REPEAT.times do |i|
  setups.each do |name|
    samples[name] << measure(name)
    warn format("run %<run>d/%<total>d  %-24<name>s PSS %<pss>.1f MiB",
                run: i + 1, total: REPEAT, name:, pss: samples[name].last / 1024.0)
  end
end

median = ->(xs) { xs.sort[xs.size / 2] }
base = median.call(samples["puma alone"])
rows = setups.map do |name|
  m = median.call(samples[name])
  spread = (samples[name].max - samples[name].min) / 1024.0
  added = name == "puma alone" ? "–" : format("%+.1f", (m - base) / 1024.0)
  format("| %-24<name>s | %6.1<pss>f | %4.1<spread>f | %6<added>s |",
         name:, pss: m / 1024.0, spread:, added:)
end
table = <<~MD
  Idle PSS of the whole process tree, Puma 5.6 cluster with 2 workers; median of #{REPEAT} interleaved runs,
  #{Time.now.utc.strftime('%Y-%m-%d')}, #{RUBY_DESCRIPTION.split(' [').first}.

  | setup                    | PSS MiB | spread | added MiB |
  |--------------------------|--------:|-------:|----------:|
  #{rows.join("\n")}
MD
puts table
FileUtils.mkdir_p(File.join(ROOT, "bench", "results"))
File.write(File.join(ROOT, "bench", "results", "memory.md"), table)
