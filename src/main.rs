fn main() {
    println!("tuna: see `tuna info`");
}
