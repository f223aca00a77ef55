# frozen_string_literal: true

require "spec_helper"
require "fileutils"

# bin/demo and bin/test on a machine where something they need is missing:
# each runs bin/setup first. A stand-in dpkg-query reports MISSING_PACKAGES
# as not installed and a stand-in apt-get records what it was asked to
# install (nothing is installed for real); the rest of bin/setup runs as is.
RSpec.describe "bin/demo and bin/test on a fresh machine" do
  let(:fake_bin) { Dir.mktmpdir("thruster-fake-bin") }
  let(:apt_log) { File.join(fake_bin, "apt.log") }

  before do
    write_tool("dpkg-query", <<~SH)
      for arg; do pkg=$arg; done
      case " $MISSING_PACKAGES " in *" $pkg "*) echo "unknown ok not-installed"; exit 0 ;; esac
      exec /usr/bin/dpkg-query "$@"
    SH
    write_tool("apt-get", %(echo "$*" >> "#{apt_log}"))
    write_tool("sudo", 'exec "$@"')
  end

  after { FileUtils.rm_rf(fake_bin) }

  def write_tool(name, body)
    path = File.join(fake_bin, name)
    File.write(path, "#!/bin/sh\n#{body}")
    File.chmod(0o755, path)
  end

  def run_script(script, missing)
    env = { "PATH" => "#{fake_bin}:#{ENV.fetch('PATH')}", "MISSING_PACKAGES" => missing.join(" "),
            "DEMO_PORT" => free_port.to_s, "DEMO_TARGET_PORT" => free_port.to_s }
    ChildProcess.start(env, File.join(ROOT, script), chdir: ROOT)
  end

  def apt_calls = File.exist?(apt_log) ? File.readlines(apt_log, chomp: true) : []

  it "bin/demo runs bin/setup when a package it needs is missing, then serves" do
    thrust_path # compiled, so bin/demo does not build
    demo = run_script("bin/demo", %w[ruby-dev])
    demo.wait_for_output(/"msg":"Server started"/, timeout: 60)
    expect(demo.output).to include("bin/demo: missing: Debian packages: ruby-dev; running bin/setup")
    expect(apt_calls.grep(/\binstall\b/)).to eq(["install -y -qq --no-install-recommends ruby-dev"])
  end

  it "bin/demo goes straight to the demo when nothing is missing" do
    thrust_path
    demo = run_script("bin/demo", [])
    demo.wait_for_output(/"msg":"Server started"/, timeout: 30)
    expect(demo.output).not_to include("bin/setup")
    expect(apt_calls).to be_empty
  end

  it "bin/test runs bin/setup first when a package it needs is missing (only bin/test's: caddy)" do
    test = run_script("bin/test", %w[caddy])
    test.wait_for_output(/==> cargo fmt --check/, timeout: 60)
    expect(test.output).to include("==> bin/setup (missing: Debian packages: caddy)")
    expect(apt_calls.grep(/\binstall\b/)).to eq(["install -y -qq --no-install-recommends caddy"])
    # caddy is not one bin/demo needs.
    expect(`MISSING_PACKAGES=caddy PATH=#{fake_bin}:$PATH #{ROOT}/bin/setup --check demo`).to eq("")
  end

  it "bin/test starts with its first step when nothing is missing" do
    test = run_script("bin/test", [])
    test.wait_for_output(/==> cargo fmt --check/, timeout: 30)
    expect(test.output).not_to include("bin/setup")
    expect(apt_calls).to be_empty
  end
end
