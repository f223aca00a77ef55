# frozen_string_literal: true

require "spec_helper"
require "rbconfig"
require "English"

# Builds the gems and installs them into a temporary GEM_HOME, then runs the
# installed `thrust` from outside the checkout, in front of a real Puma.
RSpec.describe "installed gems" do
  let(:gem_home) { Dir.mktmpdir("thruster-gem-home") }
  let(:outside) { Dir.mktmpdir("thruster-outside") }
  let(:version) { File.read(File.join(ROOT, "lib/thruster/version.rb"))[/"(.+)"/, 1] }
  # Keep the system gems (puma, rack) visible; install only into gem_home.
  let(:gem_env) do
    { "GEM_HOME" => gem_home, "GEM_PATH" => ([gem_home] + Gem.default_path).join(":"),
      "BUNDLE_GEMFILE" => nil, "RUBYOPT" => nil, "BUNDLER_SETUP" => nil }
  end

  def sh!(env, *cmd, chdir: ROOT)
    out = IO.popen(env, cmd, chdir:, err: %i[child out], &:read)
    raise "#{cmd.join(' ')} failed (#{$CHILD_STATUS.exitstatus}):\n#{out}" unless $CHILD_STATUS.success?

    out
  end

  def serves_through_installed_thrust(env)
    thrust_bin = File.join(gem_home, "bin", "thrust")
    expect(sh!(env, thrust_bin, "--version", chdir: outside)).to include(version)
    target = free_port
    thrust = ChildProcess.start(
      env.merge("HTTP_PORT" => "0", "TARGET_PORT" => target.to_s),
      thrust_bin, "puma", "-C", File.join(FIXTURES, "puma.rb"), File.join(FIXTURES, "app.ru"),
      chdir: outside
    )
    port = thrust.http_port
    response = wait_for_ok(port, message: "Puma behind the installed thrust")
    expect(response.body).to eq("up")
    expect_native_extension_from_gem_home(env)
  end

  def expect_native_extension_from_gem_home(env)
    script = 'require "thruster-rs"; print $LOADED_FEATURES.grep(/thruster_rs\.so/).first, " ", ' \
             "Thruster::Native.core_version"
    loaded = sh!(env, RbConfig.ruby, "-e", script, chdir: outside)
    expect(loaded).to start_with(gem_home).and end_with(version)
  end

  it "builds the source gem, compiles it with cargo on install, and runs thrust" do
    sh!({}, RbConfig.ruby, "-S", "rake", "gem")
    gem_file = File.join(ROOT, "pkg", "thruster-rs-#{version}.gem")
    # Reuse the checkout's compiled dependencies; the gem's own crates are
    # compiled from the files packed in the gem.
    install_env = gem_env.merge("CARGO_TARGET_DIR" => File.join(ROOT, "target"))
    sh!(install_env, "gem", "install", "--local", "--no-document", gem_file, chdir: outside)
    serves_through_installed_thrust(gem_env)
  end

  it "builds the x86_64-linux platform gem, which installs and runs without cargo" do
    sh!({}, RbConfig.ruby, "-S", "rake", "native")
    gem_file = File.join(ROOT, "pkg", "thruster-rs-#{version}-x86_64-linux.gem")
    no_rust = gem_env.merge("PATH" => "/usr/local/bin:/usr/bin:/bin", "CARGO" => "/nonexistent/cargo")
    expect(sh!(no_rust, "sh", "-c", "command -v cargo || echo no-cargo")).to include("no-cargo")
    sh!(no_rust, "gem", "install", "--local", "--no-document", gem_file, chdir: outside)
    expect(Dir.glob(File.join(gem_home, "gems", "*", "ext"))).to be_empty
    serves_through_installed_thrust(no_rust)
  end
end
